import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.partition import PartitionError, partition, partition_key
from pipeline.data.subject_lists import parse_subjects, resolve_subjects
from pipeline.data.subjects import SubjectError, load_subjects, partition_by_subject, synthetic_subjects
from pipeline.errors import UserError

# --- synthetic subjects ----------------------------------------------------------------------


def test_synthetic_subjects_are_deterministic_per_seed_and_independent_of_id_order():
    ids = np.arange(200, dtype=np.int64)
    a, b, c = synthetic_subjects(ids, seed=1), synthetic_subjects(ids, seed=1), synthetic_subjects(ids, seed=2)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    shuffled = np.random.default_rng(0).permutation(ids)
    assert dict(zip(shuffled.tolist(), synthetic_subjects(shuffled, seed=1).tolist())) == dict(zip(ids.tolist(), a.tolist()))


def test_synthetic_subject_sizes_are_1_to_8_with_mean_about_3():
    subjects = synthetic_subjects(np.arange(3000, dtype=np.int64), seed=0)
    sizes = pd.Series(subjects).value_counts().to_numpy()
    assert sizes.min() >= 1 and sizes.max() <= 8
    assert 2.7 < sizes.mean() < 3.3
    assert all(s.startswith("subj-") and len(s) == len("subj-000123") for s in subjects)


@pytest.mark.parametrize("n", [1797, 60000])  # digits' private set; Fashion-MNIST's training set
def test_synthetic_subjects_own_a_few_samples_each_on_digits_and_fashion_mnist(n):
    sizes = pd.Series(synthetic_subjects(np.arange(n, dtype=np.int64), seed=0)).value_counts().to_numpy()
    assert sizes.max() <= 8 and 2.7 < sizes.mean() < 3.3
    assert np.mean(sizes == 1) < 0.2 and np.mean(sizes >= 3) > 0.5


def test_synthetic_subjects_do_not_own_adjacent_ids():
    subjects = synthetic_subjects(np.arange(600, dtype=np.int64), seed=0)
    assert np.mean(subjects[1:] == subjects[:-1]) < 0.05  # a run of adjacent ids would make this ≈ 2/3


def test_synthetic_subjects_handle_empty_and_refuse_duplicate_ids():
    assert synthetic_subjects(np.array([], np.int64), seed=0).shape == (0,)
    with pytest.raises(SubjectError, match="more than once"):
        synthetic_subjects(np.array([1, 2, 2]), seed=0)


# --- load_subjects ----------------------------------------------------------------------------


def _csv(tmp_path, text, name="subjects.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _parquet(tmp_path, sample_ids, subject_ids, name="subjects.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table({"sample_id": sample_ids, "subject_id": subject_ids}), path)
    return str(path)


def test_load_subjects_from_csv_aligns_with_ids_and_ignores_extra_rows(tmp_path):
    path = _csv(tmp_path, "sample_id,subject_id,note\n3,alice,x\n1, bob ,y\n2,007,z\n9,carol,w\n")
    got = load_subjects(path, np.array([2, 3, 1]))
    assert got.tolist() == ["007", "alice", "bob"]  # text kept as text, spaces stripped, row 9 ignored


def test_load_subjects_from_parquet_reads_integer_subjects_as_text(tmp_path):
    path = _parquet(tmp_path, pa.array([5, 6, 7], pa.int64()), pa.array([10, 10, 11], pa.int64()))
    assert load_subjects(path, np.array([7, 5])).tolist() == ["11", "10"]


def test_load_subjects_refuses_a_missing_file(tmp_path):
    with pytest.raises(SubjectError, match="does not exist"):
        load_subjects(str(tmp_path / "nope.csv"), np.array([1]))


def test_load_subjects_refuses_an_unsupported_extension(tmp_path):
    with pytest.raises(SubjectError, match="extension '.json'"):
        load_subjects(_csv(tmp_path, "{}", "subjects.json"), np.array([1]))


@pytest.mark.parametrize("header", ["sample_id,person\n1,a\n", "id,subject_id\n1,a\n"])
def test_load_subjects_refuses_missing_columns(tmp_path, header):
    with pytest.raises(SubjectError, match="lacks column"):
        load_subjects(_csv(tmp_path, header), np.array([1]))


def test_load_subjects_refuses_a_sample_listed_twice(tmp_path):
    with pytest.raises(SubjectError, match="sample_id 1 more than once"):
        load_subjects(_csv(tmp_path, "sample_id,subject_id\n1,a\n1,b\n2,c\n"), np.array([1, 2]))


def test_load_subjects_names_up_to_five_uncovered_ids(tmp_path):
    path = _csv(tmp_path, "sample_id,subject_id\n0,a\n")
    with pytest.raises(SubjectError, match=r"no subject for 7 of the run's 8 sample ids \(1, 2, 3, 4, 5 and 2 more\)"):
        load_subjects(path, np.arange(8))


def test_load_subjects_refuses_empty_subject_ids_in_csv_and_parquet(tmp_path):
    with pytest.raises(SubjectError, match="empty subject_id"):
        load_subjects(_csv(tmp_path, "sample_id,subject_id\n1,a\n2,\n3,  \n"), np.array([1]))
    with pytest.raises(SubjectError, match="empty subject_id"):
        load_subjects(_parquet(tmp_path, [1, 2], pa.array(["a", None])), np.array([1]))


def test_load_subjects_refuses_non_integer_sample_ids(tmp_path):
    with pytest.raises(SubjectError, match="not an integer"):
        load_subjects(_csv(tmp_path, "sample_id,subject_id\n1.5,a\n"), np.array([1]))
    with pytest.raises(SubjectError, match="integer column"):
        load_subjects(_parquet(tmp_path, ["1"], ["a"]), np.array([1]))


def test_load_subjects_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError) as info:
        load_subjects(_csv(tmp_path, "sample_id,subject_id\n"), np.array([1, 2]))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


# --- partition_by_subject ---------------------------------------------------------------------


def _subjects(n, seed=0):
    ids = np.arange(n, dtype=np.int64)
    return ids, synthetic_subjects(ids, seed)


def test_by_subject_keeps_each_subject_in_one_shard_and_one_slice_and_covers_every_id_once():
    ids, subjects = _subjects(400)
    cols = partition_by_subject(ids, subjects, shards=3, slices=4, seed=1)
    assert sorted(cols["sample_id"].tolist()) == ids.tolist()
    owner = dict(zip(ids.tolist(), subjects.tolist()))
    cells = pd.DataFrame({"subject": [owner[i] for i in cols["sample_id"].tolist()], "shard": cols["shard"], "slice": cols["slice"]})
    assert (cells.groupby("subject")[["shard", "slice"]].nunique() == 1).all().all()
    assert set(zip(cols["shard"].tolist(), cols["slice"].tolist())) == {(s, r) for s in range(3) for r in range(4)}


def test_by_subject_has_the_output_format_of_partition():
    ids, subjects = _subjects(60)
    ours, theirs = partition_by_subject(ids, subjects, 2, 3, seed=0), partition(ids, np.zeros(60), 2, 3, seed=0)
    assert list(ours) == list(theirs) == ["sample_id", "shard", "slice"]
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    order = ours["shard"].astype(np.int64) * 3 + ours["slice"]
    assert np.all(np.diff(order) >= 0)  # sorted by shard, then slice


def test_by_subject_cell_is_the_keyed_hash_of_the_subject_id_and_sizes_vary_by_chance():
    ids, subjects = _subjects(3000, seed=3)
    cols = partition_by_subject(ids, subjects, shards=5, slices=4, seed=0)
    owner = dict(zip(ids.tolist(), subjects.tolist()))
    key = partition_key(0)
    for i, shard, slice_ in list(zip(cols["sample_id"].tolist(), cols["shard"].tolist(), cols["slice"].tolist()))[::97]:
        digest = hashlib.blake2b(owner[i].encode(), key=key, person=b"dpsisa:subject", digest_size=24).digest()
        assert (shard, slice_) == (int.from_bytes(digest[:8], "little") % 5, int.from_bytes(digest[8:16], "little") % 4)
    people = pd.DataFrame({"subject": [owner[i] for i in cols["sample_id"].tolist()], "cell": cols["shard"] * 4 + cols["slice"]})
    per_cell = people.drop_duplicates("subject")["cell"].value_counts().reindex(range(20), fill_value=0).to_numpy()
    n = people["subject"].nunique()
    assert len(set(per_cell.tolist())) > 1 and np.all(np.abs(per_cell - n / 20) < 6 * np.sqrt(n / 20))


def test_by_subject_is_the_same_for_the_same_seed():
    ids, subjects = _subjects(300)
    a, b = partition_by_subject(ids, subjects, 3, 2, seed=5), partition_by_subject(ids, subjects, 3, 2, seed=5)
    c = partition_by_subject(ids, subjects, 3, 2, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["sample_id"], c["sample_id"])


def test_by_subject_slice_the_hash_leaves_empty_is_a_one_line_error_naming_the_fix():
    ids = np.arange(11, dtype=np.int64)
    subjects = np.array(["big"] * 8 + ["a", "b", "c"], dtype=object)
    empty = r"left shard \d slice \d empty by chance \(4 subjects .*lower shards.slices or shards.count"
    with pytest.raises(PartitionError, match=empty) as info:
        partition_by_subject(ids, subjects, shards=2, slices=2, seed=0)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_by_subject_refuses_fewer_subjects_than_slices():
    ids = np.arange(6, dtype=np.int64)
    with pytest.raises(SubjectError, match=r"only 3 subjects for shards.count=2 × shards.slices=2 = 4 slices"):
        partition_by_subject(ids, np.array(list("aabbcc"), dtype=object), shards=2, slices=2, seed=0)


def test_by_subject_refuses_misaligned_or_empty_subjects():
    with pytest.raises(SubjectError, match="one subject per sample"):
        partition_by_subject(np.arange(3), np.array(["a", "b"], dtype=object), 1, 1, seed=0)
    with pytest.raises(SubjectError, match="empty subject id"):
        partition_by_subject(np.arange(2), np.array(["a", ""], dtype=object), 1, 1, seed=0)


# --- parse_subjects / resolve_subjects ------------------------------------------------------


def test_parse_subjects_splits_on_commas_and_newlines_and_strips_spaces():
    assert parse_subjects(" alice, bob ", "--subject") == ["alice", "bob"]
    assert parse_subjects("alice\nbob, carol\n", "--subjects-file F") == ["alice", "bob", "carol"]


@pytest.mark.parametrize("text, where", [
    ("a,,b", "empty item at position 2"),
    (",a", "empty item at position 1"),
    ("a,", "empty item at position 2"),
    ("a\n\nb", "blank line at line 2"),
    ("a\nb,\n", "empty item at line 2, position 2"),
    ("a\n\n", "blank line at line 2"),
])
def test_parse_subjects_refuses_empty_items(text, where):
    with pytest.raises(SubjectError, match=where):
        parse_subjects(text, "--subject")


def test_parse_subjects_refuses_an_empty_list():
    with pytest.raises(SubjectError, match="--subject is empty"):
        parse_subjects("  \n", "--subject")


def test_resolve_subjects_maps_each_subject_to_its_sorted_ids():
    ids = np.array([9, 4, 7, 1], np.int64)
    subjects = np.array(["bob", "alice", "bob", "carol"], dtype=object)
    assert resolve_subjects(ids, subjects, ["bob", "carol"]) == {"bob": [7, 9], "carol": [1]}


def test_resolve_subjects_names_up_to_ten_unknown_subjects():
    ids, subjects = np.arange(2), np.array(["a", "b"], dtype=object)
    wanted = ["a"] + [f"x{i}" for i in range(12)]
    with pytest.raises(SubjectError, match=r"12 subjects are not in .*\(x0, .*, x9 and 2 more\)"):
        resolve_subjects(ids, subjects, wanted)


def test_resolve_subjects_refuses_duplicates_and_empty_items():
    ids, subjects = np.arange(2), np.array(["a", "b"], dtype=object)
    with pytest.raises(SubjectError, match="subject a is listed more than once"):
        resolve_subjects(ids, subjects, ["a", "b", "a"])
    with pytest.raises(SubjectError, match="empty item at position 2"):
        resolve_subjects(ids, subjects, ["a", " "])
    with pytest.raises(SubjectError, match="no subjects were given"):
        resolve_subjects(ids, subjects, [])
