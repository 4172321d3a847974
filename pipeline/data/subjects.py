"""Subjects: which person each private sample belongs to, and a partition that keeps a person together.

A subject table maps sample_id → subject_id. A run reads it from a Parquet or CSV file
(`load_subjects`, config key `data.subjects`); the bundled data sets have no people in them, so
`synthetic_subjects` makes a seeded stand-in table (each subject owns 1–8 samples, mean ≈ 3) in
which a sample's subject depends only on (seed, id), not on the rest of the data.
`partition_by_subject` is the `by_subject` partition: a keyed hash of each subject id puts every
subject's samples in one shard and, within it, one slice, so erasing a person retrains one shard
from one slice on, and adding or removing a person moves nobody else. Its output has the columns
of `partition.partition`. `subject_lists` turns a `--subject` list into the sample ids to forget.

Pure numpy/pandas/pyarrow: no Ray, no torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError


class SubjectError(UserError, ValueError):
    """The subject table or a subject list is invalid, or cannot be partitioned as asked; nothing was changed."""


MAX_SUBJECT_SIZE = 8  # synthetic subjects own 1 + Poisson(2) samples, clipped to this
SYNTHETIC_POISSON_MEAN = 2.0
SYNTHETIC_BLOCK = 256  # the synthetic table deals each block of 256 consecutive ids to its own people
_ORDER_DOMAIN = b"dpsisa:subj-deal"  # BLAKE2b personalisations of the synthetic table's two hashes
_SIZE_DOMAIN = b"dpsisa:subj-size"


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


def _poisson_sizes(uniforms: np.ndarray) -> np.ndarray:
    """1 + Poisson(2) clipped to 8, by inverting the CDF at each uniform in [0, 1)."""
    k = np.arange(MAX_SUBJECT_SIZE - 1)
    pmf = np.exp(-SYNTHETIC_POISSON_MEAN) * SYNTHETIC_POISSON_MEAN ** k / np.cumprod(np.maximum(k, 1))
    return 1 + np.searchsorted(np.cumsum(pmf), uniforms, side="right")  # 1..MAX_SUBJECT_SIZE


def _subject_numbers(block: int, key: bytes) -> np.ndarray:
    """Subject number of each of the ids block·B … block·B + B − 1 (B = SYNTHETIC_BLOCK), in id order."""
    from pipeline.data.keyed import id_items, keyed_words

    members = block * SYNTHETIC_BLOCK + np.arange(SYNTHETIC_BLOCK, dtype=np.int64)
    deal = keyed_words(key, id_items(members), _ORDER_DOMAIN, words=1)[:, 0]
    order = np.lexsort((members, deal))  # the block's ids in a keyed order (ties, never seen, by id)
    draws = keyed_words(key, id_items(members), _SIZE_DOMAIN, words=1)[:, 0]  # one size per subject slot of the block
    sizes = _poisson_sizes((draws >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    slot = np.searchsorted(np.cumsum(sizes), np.arange(SYNTHETIC_BLOCK), side="right")  # B sizes ≥ 1 always cover B ids
    numbers = np.empty(SYNTHETIC_BLOCK, np.int64)
    numbers[order] = block * SYNTHETIC_BLOCK + slot
    return numbers


def synthetic_subjects(ids: np.ndarray, seed: int) -> np.ndarray:
    """A stand-in subject table for data without people: subject id ("subj-000123") per id, aligned with `ids`.

    A sample's subject depends only on (seed, its id), never on which other ids are present: the id
    space is cut into blocks of SYNTHETIC_BLOCK = 256 consecutive ids (block b: ids 256b … 256b+255,
    whether present or not). Within a block, the ids are put in a keyed order (BLAKE2b of the id,
    keyed by `partition.derive_key(seed, "subjects")`) and dealt out in consecutive runs of sizes
    drawn from the same key: subject slot k of block b has size 1 + Poisson(2) clipped to 8 and is
    named subj-(256b + k), zero-padded to 6 digits. So adding or removing a sample changes no other
    sample's subject, and a subject's samples are not adjacent ids (they lie within one block).

    Sizes: every subject owns between 1 and 8 ids — P(1) ≈ 0.135, P(2) ≈ 0.271, P(3) ≈ 0.271,
    P(4) ≈ 0.180, P(5) ≈ 0.090, P(6) ≈ 0.036, P(7) ≈ 0.012, P(8) ≈ 0.005 — mean ≈ 3.0, except the
    block's last subject, cut to what the block has left; a data set holding only part of a block
    (its last ids, or a subset) gives its people only the samples it holds. Subject numbers have gaps
    (a block has fewer than 256 people). The table does not depend on the order of `ids`.

    Returns an object array of str, same length and order as `ids`.
    """
    from pipeline.data.keyed import derive_key

    ids = _unique_ids(ids, "the sample ids")
    if len(ids) == 0:
        return np.empty(0, dtype=object)
    key = derive_key(seed, "subjects")
    blocks = ids // SYNTHETIC_BLOCK
    numbers = np.empty(len(ids), np.int64)
    for block in np.unique(blocks).tolist():
        mine = blocks == block
        numbers[mine] = _subject_numbers(block, key)[ids[mine] - block * SYNTHETIC_BLOCK]
    return np.array([f"subj-{n:06d}" for n in numbers.tolist()], dtype=object)


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


def partition_by_subject(ids: np.ndarray, subjects: np.ndarray, shards: int, slices: int, seed: int,
                         key: str | None = None) -> dict[str, np.ndarray]:
    """`partition.strategy=by_subject`: every subject's samples in exactly one shard and one slice.

    Same output as `partition.partition`: columns `sample_id` (int64), `shard` (int32), `slice`
    (int32), one row per id, sorted by shard then slice; within a slice the ids are in the order of
    their own keyed hash. `subjects[i]` is the subject of `ids[i]`.

    A subject's cell is a keyed hash of its subject id (its text): shard = h₀ mod S, slice = h₁ mod
    R, with the key `partition.partition_key(seed, key)`. So it depends only on (key, subject id):
    adding or removing a sample or a person moves nobody else. Shard and slice sizes vary by chance
    (by the number of subjects and their sizes) and are treated as public. Raises `SubjectError` if
    there are fewer subjects than shards × slices, and `PartitionError` if the hash leaves a slice
    empty by chance.
    """
    from pipeline.data.keyed import check_cells, columns, partition_key, sample_words, subject_words

    ids = _unique_ids(ids, "the sample ids")
    subjects = np.asarray(subjects, dtype=object)
    if subjects.shape != ids.shape:
        raise SubjectError(f"{len(subjects)} subject ids for {len(ids)} sample ids; give one subject per sample.")
    if shards < 1 or slices < 1:
        raise SubjectError(f"shards.count={shards} and shards.slices={slices} must both be at least 1.")
    names = np.array([str(s).strip() if s is not None else "" for s in subjects], dtype=object)
    if (names == "").any():
        raise SubjectError(f"sample id {_shown(ids[names == ''], 5)} has an empty subject id; give every sample a subject id.")
    unique, owner = np.unique(names.astype(str), return_inverse=True)
    owner = owner.reshape(-1)
    cells = shards * slices
    if len(unique) < cells:
        raise SubjectError(
            f"partition.strategy=by_subject needs a subject per slice, but {len(ids)} samples have only {len(unique)} subjects "
            f"for shards.count={shards} × shards.slices={slices} = {cells} slices; lower shards.count or shards.slices, "
            "or use more data."
        )
    hash_key = partition_key(seed, key)
    person = subject_words(unique, hash_key)
    subject_shard = (person[:, 0] % np.uint64(shards)).astype(np.int64)
    subject_slice = (person[:, 1] % np.uint64(slices)).astype(np.int64)
    sample_shard, sample_slice = subject_shard[owner], subject_slice[owner]
    check_cells(sample_shard, sample_slice, shards, slices, f"{len(unique)} subjects", "by_subject")
    return columns(ids, sample_shard, sample_slice, sample_words(ids, hash_key)[:, 2])


SYNTHETIC_SEED = 0  # a property of the data set, not of a run: every run of a data set agrees on who owns what


def for_private_ids(path: str | None, ids: np.ndarray) -> np.ndarray:
    """Subject of each private id: from the `data.subjects` table when given, else synthetic."""
    return load_subjects(path, ids) if path else synthetic_subjects(ids, SYNTHETIC_SEED)
