"""Subjects: which person each private sample belongs to, and a partition that keeps a person together.

A subject table maps sample_id → subject_id. A run reads it from a Parquet or CSV file
(`load_subjects`, config key `data.subjects`); the bundled data sets have no people in them, so
`synthetic_subjects` makes a seeded stand-in table (each subject owns 1–8 samples, mean ≈ 3).
`partition_by_subject` is the `by_subject` partition: every subject's samples land in one shard
and, within it, one slice, so erasing a person retrains one shard from one slice on. Its output
has the columns of `partition.partition`. `parse_subjects` and `resolve_subjects` turn a
`--subject` list into the sample ids to forget.

Pure numpy/pandas/pyarrow: no Ray, no torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.id_lists import split_items
from pipeline.errors import UserError


class SubjectError(UserError, ValueError):
    """The subject table or a subject list is invalid, or cannot be partitioned as asked; nothing was changed."""


MAX_SUBJECT_SIZE = 8  # synthetic subjects own 1 + Poisson(2) samples, clipped to this
SYNTHETIC_POISSON_MEAN = 2.0
_SYNTHETIC_SALT = 3571  # separates the synthetic table's random stream from other users of the same seed
_PARTITION_SALT = 104729


def _shown(values, limit: int) -> str:
    values = list(values)
    head = ", ".join(str(v) for v in values[:limit])
    return head + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _unique_ids(ids: np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise SubjectError(f"{what} must be a 1-D array of sample ids, got shape {ids.shape}.")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise SubjectError(f"{what} must be integer sample ids, got dtype {ids.dtype}.")
    ids = ids.astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise SubjectError(f"{what} lists sample ids more than once ({_shown(unique[counts > 1], 5)}); sample ids must be unique.")
    return ids


# ---------------------------------------------------------------------------------------------
# Synthetic table
# ---------------------------------------------------------------------------------------------


def synthetic_subjects(ids: np.ndarray, seed: int) -> np.ndarray:
    """A stand-in subject table for data without people: subject id ("subj-000123") per id, aligned with `ids`.

    Distribution: subject sizes are i.i.d. 1 + Poisson(2) clipped to 8, so every subject owns
    between 1 and 8 samples — P(1) ≈ 0.135, P(2) ≈ 0.271, P(3) ≈ 0.271, P(4) ≈ 0.180, P(5) ≈ 0.090,
    P(6) ≈ 0.036, P(7) ≈ 0.012, P(8) ≈ 0.005 — with mean ≈ 3.0 (so about n/3 subjects for n ids).
    Sizes are drawn until they cover all ids; the last subject takes what is left (1..its drawn
    size). The ids are sorted, then shuffled with a generator seeded by `seed`, and the shuffled
    ids are dealt out in consecutive blocks of those sizes: subject k (numbered from 0) owns the
    k-th block. So a subject's samples are not adjacent ids, and the table depends only on the
    set of ids and the seed (not on their order in `ids`). Subject ids are zero-padded to 6
    digits (wider only past a million subjects).

    Returns an object array of str, same length and order as `ids`.
    """
    ids = _unique_ids(ids, "the sample ids")
    n = len(ids)
    if n == 0:
        return np.empty(0, dtype=object)
    rng = np.random.default_rng([int(seed), _SYNTHETIC_SALT])
    order = rng.permutation(np.sort(ids))  # sorted first: the table must not depend on the order of `ids`
    sizes = np.minimum(1 + rng.poisson(SYNTHETIC_POISSON_MEAN, size=n), MAX_SUBJECT_SIZE)  # n draws always suffice
    ends = np.cumsum(sizes)
    count = int(np.searchsorted(ends, n)) + 1  # the first subject whose block reaches the last id
    owner = np.repeat(np.arange(count), sizes[:count])[:n]  # trims the last subject to what is left
    width = max(6, len(str(count - 1)))
    names = np.array([f"subj-{k:0{width}d}" for k in range(count)], dtype=object)
    result = np.empty(n, dtype=object)
    position = np.argsort(ids, kind="stable")  # ids are unique: position[j] is where the j-th smallest id sits in `ids`
    rank = np.searchsorted(ids[position], order)  # rank of each shuffled id among the sorted ids
    result[position[rank]] = names[owner]
    return result


# ---------------------------------------------------------------------------------------------
# Subject table from a file
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("sample_id", "subject_id")
_FORMAT_HINT = "a .parquet or .csv file with columns sample_id (integer) and subject_id (text)"


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise SubjectError(f"data.subjects file '{path}' is empty; give {_FORMAT_HINT}.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SubjectError(f"data.subjects file '{path}' cannot be read as CSV ({cause}); give {_FORMAT_HINT}.") from None
    _check_columns(path, list(frame.columns))
    raw = frame["sample_id"].str.strip()
    bad = ~raw.str.fullmatch(r"[+-]?\d+")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SubjectError(
            f"data.subjects file '{path}' has a sample_id that is not an integer ('{raw.iloc[row]}' on line {row + 2}); "
            "give integer sample ids."
        )
    try:
        sample_ids = raw.astype(np.int64).to_numpy()
    except (OverflowError, ValueError):
        raise SubjectError(f"data.subjects file '{path}' has a sample_id out of the int64 range; give the run's sample ids.") from None
    return sample_ids, frame["subject_id"].to_numpy(dtype=object)


def _read_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        _check_columns(path, schema.names)
        table = pq.read_table(path, columns=list(_COLUMNS))
    except SubjectError:
        raise
    except (pa.ArrowException, OSError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SubjectError(f"data.subjects file '{path}' cannot be read as Parquet ({cause}); give {_FORMAT_HINT}.") from None
    sample_col, subject_col = table.column("sample_id"), table.column("subject_id")
    if not pa.types.is_integer(sample_col.type):
        raise SubjectError(f"data.subjects file '{path}': column sample_id has type {sample_col.type}; it must be an integer column.")
    if sample_col.null_count:
        raise SubjectError(f"data.subjects file '{path}' has {sample_col.null_count} rows without a sample_id; give every row one.")
    if not (pa.types.is_string(subject_col.type) or pa.types.is_large_string(subject_col.type)):
        try:
            subject_col = pc.cast(subject_col, pa.string())
        except pa.ArrowException:
            raise SubjectError(
                f"data.subjects file '{path}': column subject_id has type {subject_col.type}, which cannot be read as text; "
                "store subject ids as strings."
            ) from None
    subjects = np.array(["" if s is None else s for s in subject_col.to_pylist()], dtype=object)  # null: an empty subject
    return sample_col.to_numpy().astype(np.int64), subjects


def _check_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in _COLUMNS if c not in names]
    if missing:
        raise SubjectError(
            f"data.subjects file '{path}' lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(it has: {_shown(names, 10) or 'none'}); give {_FORMAT_HINT}."
        )


def load_subjects(path: str, ids: np.ndarray) -> np.ndarray:
    """The subject id of each of `ids`, from a subject table file (`data.subjects`).

    The file is Parquet (`.parquet`) or CSV (`.csv`) with columns `sample_id` (integer) and
    `subject_id` (read as text; surrounding spaces are stripped); other columns are ignored.
    Rows whose sample_id is not among `ids` are ignored (a table may cover more data than a run
    uses). Raises `SubjectError` (one line: cause and fix) if the file is missing or of another
    kind, lacks a column, lists a sample_id twice, has an empty subject_id, or leaves some of `ids`
    without a subject.

    Returns an object array of str, same length and order as `ids`.
    """
    import pandas as pd

    file = Path(path)
    if not file.exists():
        raise SubjectError(f"data.subjects file '{path}' does not exist; fix the path, or unset data.subjects for a synthetic table.")
    if not file.is_file():
        raise SubjectError(f"data.subjects '{path}' is not a file; give {_FORMAT_HINT}.")
    suffix = file.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise SubjectError(f"data.subjects file '{path}' has extension '{file.suffix}', which is not supported; give {_FORMAT_HINT}.")
    table_ids, table_subjects = _read_parquet(file) if suffix == ".parquet" else _read_csv(file)
    table_subjects = np.array([s.strip() if isinstance(s, str) else s for s in table_subjects], dtype=object)

    empty = np.flatnonzero(table_subjects == "")
    if len(empty):
        raise SubjectError(
            f"data.subjects file '{path}' has {len(empty)} row{'s' if len(empty) > 1 else ''} with an empty subject_id "
            f"(sample_id {_shown(table_ids[empty], 5)}); give every sample a subject id."
        )
    unique, counts = np.unique(table_ids, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1]
        raise SubjectError(
            f"data.subjects file '{path}' lists sample_id {_shown(twice, 5)} more than once; give each sample exactly one subject."
        )

    ids = np.asarray(ids).astype(np.int64)
    where = pd.Index(table_ids).get_indexer(ids)
    uncovered = np.flatnonzero(where < 0)
    if len(uncovered):
        missing = np.unique(ids[uncovered])
        raise SubjectError(
            f"data.subjects file '{path}' has no subject for {len(missing)} of the run's {len(np.unique(ids))} sample ids "
            f"({_shown(missing, 5)}); add a row for each of them."
        )
    return table_subjects[where]


# ---------------------------------------------------------------------------------------------
# by_subject partition
# ---------------------------------------------------------------------------------------------


def _greedy(sizes: np.ndarray, bins: int, need: int) -> np.ndarray:
    """Bin of each item, taken in the given order: onto the least-loaded bin (lowest index on ties).

    With items in non-increasing size order, bin loads differ by at most the largest item. Every bin
    also gets at least `need` items: once the items left only just cover the bins still short of
    `need`, an item goes to the least-loaded of those bins (this can exceed the bound, and only
    happens when there are few items per bin). Needs len(sizes) >= bins * need.
    """
    loads = np.zeros(bins, np.int64)
    counts = np.zeros(bins, np.int64)
    short = bins * need  # items still owed to bins below `need`
    result = np.empty(len(sizes), np.int64)
    for i, size in enumerate(sizes):
        left = len(sizes) - i
        if left <= short:
            candidates = np.flatnonzero(counts < need)
            target = int(candidates[np.argmin(loads[candidates])])
        else:
            target = int(np.argmin(loads))
        if counts[target] < need:
            short -= 1
        loads[target] += size
        counts[target] += 1
        result[i] = target
    return result


def partition_by_subject(ids: np.ndarray, subjects: np.ndarray, shards: int, slices: int, seed: int) -> dict[str, np.ndarray]:
    """`partition.strategy=by_subject`: every subject's samples in exactly one shard and one slice.

    Same output as `partition.partition`: columns `sample_id` (int64), `shard` (int32), `slice`
    (int32), one row per id, sorted by shard then slice; within a slice the ids are in a seeded
    order. `subjects[i]` is the subject of `ids[i]`.

    Balance: subjects are shuffled (seeded), ordered largest first (ties keep the shuffled order)
    and each goes to the least-loaded shard, so shard sizes differ by at most the largest subject's
    size; each shard's subjects are dealt to its slices the same way. Every shard gets at least
    `slices` subjects so that no slice is empty; when subjects are that scarce, this can cost
    balance beyond the bound. Raises `SubjectError` if there are fewer subjects than
    shards × slices.
    """
    ids = _unique_ids(ids, "the sample ids")
    subjects = np.asarray(subjects, dtype=object)
    if subjects.shape != ids.shape:
        raise SubjectError(f"{len(subjects)} subject ids for {len(ids)} sample ids; give one subject per sample.")
    if shards < 1 or slices < 1:
        raise SubjectError(f"shards.count={shards} and shards.slices={slices} must both be at least 1.")
    names = np.array([str(s).strip() if s is not None else "" for s in subjects], dtype=object)
    if (names == "").any():
        raise SubjectError(f"sample id {_shown(ids[names == ''], 5)} has an empty subject id; give every sample a subject id.")
    unique, owner, sizes = np.unique(names.astype(str), return_inverse=True, return_counts=True)
    owner = owner.reshape(-1)
    cells = shards * slices
    if len(unique) < cells:
        raise SubjectError(
            f"partition.strategy=by_subject needs a subject per slice, but {len(ids)} samples have only {len(unique)} subjects "
            f"for shards.count={shards} × shards.slices={slices} = {cells} slices; lower shards.count or shards.slices, "
            "or use more data."
        )
    rng = np.random.default_rng([int(seed), _PARTITION_SALT])
    order = rng.permutation(len(unique))
    order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, ties in the shuffled order
    subject_shard = np.empty(len(unique), np.int64)
    subject_shard[order] = _greedy(sizes[order], shards, slices)
    subject_slice = np.empty(len(unique), np.int64)
    for shard in range(shards):
        mine = order[subject_shard[order] == shard]  # still largest first
        subject_slice[mine] = _greedy(sizes[mine], slices, 1)

    sample_shard, sample_slice = subject_shard[owner], subject_slice[owner]
    sample_id, shard_col, slice_col = [], [], []
    for shard in range(shards):
        for slice_index in range(slices):
            part = rng.permutation(np.sort(ids[(sample_shard == shard) & (sample_slice == slice_index)]))
            sample_id.append(part)
            shard_col.append(np.full(len(part), shard, np.int32))
            slice_col.append(np.full(len(part), slice_index, np.int32))
    return {
        "sample_id": np.concatenate(sample_id).astype(np.int64),
        "shard": np.concatenate(shard_col),
        "slice": np.concatenate(slice_col),
    }


# ---------------------------------------------------------------------------------------------
# --subject lists
# ---------------------------------------------------------------------------------------------


def parse_subjects(text: str, source: str | None = None) -> list[str]:
    """'alice, bob' or one subject id per line → ['alice', 'bob']; an empty item is an error, nothing requested.

    Like `pipeline.data.id_lists.parse_ids` for text ids: items are separated by commas and newlines;
    spaces around an item are stripped, and one final newline (how files end) is fine. An empty
    item — 'a,,b', a leading or trailing comma, a blank line — is an error, not something to skip:
    it is how an id lost by a script (an unset shell variable) shows. `source` names the input in
    messages, e.g. "--subject".
    """
    return split_items(text, source or "the subject list", SubjectError, "a lost subject id",
                       "pass subject ids like --subject subj-000012,subj-000907.",
                       "pass only subject ids, e.g. --subject subj-000012,subj-000907 or one per line.")


def resolve_subjects(table_ids: np.ndarray, table_subjects: np.ndarray, wanted: list[str]) -> dict[str, list[int]]:
    """Each wanted subject → its sample ids (sorted), in the order of `wanted`.

    Raises `SubjectError` for an empty item, a subject listed twice, or subjects the table does not
    know (up to 10 named); nothing is requested then.
    """
    table_ids = np.asarray(table_ids).astype(np.int64)
    names = np.array([str(s).strip() if s is not None else "" for s in np.asarray(table_subjects, dtype=object)], dtype=object)
    if names.shape != table_ids.shape:
        raise SubjectError(f"the subject table has {len(names)} subject ids for {len(table_ids)} sample ids; give one per sample.")
    wanted = [w.strip() if isinstance(w, str) else w for w in wanted]
    if not wanted:
        raise SubjectError("no subjects were given; nothing was requested: pass subject ids like --subject subj-000012,subj-000907.")
    empty = [i for i, w in enumerate(wanted, 1) if not isinstance(w, str) or not w]
    if empty:
        raise SubjectError(f"the subject list has an empty item at position {_shown(empty, 5)}; "
                           "nothing was requested: pass only subject ids.")
    seen, twice = set(), []
    for w in wanted:
        if w in seen and w not in twice:
            twice.append(w)
        seen.add(w)
    if twice:
        raise SubjectError(f"subject {_shown(twice, 10)} is listed more than once; nothing was requested: list each subject once.")
    order = np.argsort(names.astype(str), kind="stable")
    sorted_names = names[order].astype(str)
    result, unknown = {}, []
    for w in wanted:
        lo, hi = np.searchsorted(sorted_names, w, "left"), np.searchsorted(sorted_names, w, "right")
        if lo == hi:
            unknown.append(w)
        else:
            result[w] = sorted(int(i) for i in table_ids[order[lo:hi]])
    if unknown:
        raise SubjectError(
            f"{len(unknown)} subject{'s are' if len(unknown) > 1 else ' is'} not in the run's subject table "
            f"({_shown(unknown, 10)}); nothing was requested: "
            "pass subject ids from the run's subject table (data.subjects, or the synthetic one)."
        )
    return result


SYNTHETIC_SEED = 0  # a property of the data set, not of a run: every run of a data set agrees on who owns what


def for_private_ids(path: str | None, ids: np.ndarray) -> np.ndarray:
    """Subject of each private id: from the `data.subjects` table when given, else synthetic."""
    return load_subjects(path, ids) if path else synthetic_subjects(ids, SYNTHETIC_SEED)
