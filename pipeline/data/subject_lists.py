"""Subject lists: `--subject` / `--subjects-file` text → subject ids (`parse_subjects`), and subject
ids → the sample ids they own in a run's subject table (`resolve_subjects`). Pure numpy."""
from __future__ import annotations

import numpy as np

from pipeline.data.id_lists import split_items
from pipeline.data.subjects import SubjectError, _shown

__all__ = ["SubjectError", "parse_subjects", "resolve_subjects"]


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
