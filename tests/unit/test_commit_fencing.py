"""Fenced commits (issue 17): a shard's manifest is replaced only if it is still the one the replay
started from; a stale writer's commit fails cleanly, removes its own new files and changes nothing.
Local disks here (compare and write under a lock); S3 (conditional PUT) in tests/integration/test_s3_store.py."""
from __future__ import annotations

import pytest

from pipeline.core.checkpoints import Manifest, ShardStore, StaleCommit
from pipeline.fs import PreconditionFailed, Storage


def _version(store: ShardStore, old: Manifest | None, version: int, writer: str) -> Manifest:
    entries = [store.write_stage(0, version, {"ids_digest": "d", "samples": 1, "w": version}, writer)]
    data = store.write_data(version, [1, 2], [[0.0], [1.0]], [0, 1], writer)
    releases = (old.releases if old else []) + [{"version": version, "ids": [version]}]
    return Manifest(store.shard, version, entries, [], releases, data)


def _files(store: ShardStore) -> set[str]:
    return set(store.storage.list())


def test_a_stale_writer_cannot_commit_and_leaves_the_live_version_and_its_files_untouched(tmp_path):
    store = ShardStore(Storage(tmp_path), 0)
    v0 = _version(store, None, 0, "")
    store.commit(None, v0)
    read_a, tag_a = store.manifest_tagged()
    read_b, tag_b = store.manifest_tagged()  # two writers start from the same version
    assert tag_a == tag_b
    a = _version(store, read_a, 1, "aaaaaaaa")
    store.commit(read_a, a, expected=tag_a)
    live_files = _files(store)
    b = _version(store, read_b, 1, "bbbbbbbb")  # same version number, its own fresh names
    with pytest.raises(StaleCommit, match="another writer committed"):
        store.commit(read_b, b, expected=tag_b)
    assert store.manifest().to_dict() == a.to_dict()  # writer A's version stays live
    assert _files(store) == live_files  # B's files are gone, A's are all there
    assert store.load_stage(store.manifest(), 0)["w"] == 1


def test_a_commit_from_the_current_manifest_goes_through(tmp_path):
    store = ShardStore(Storage(tmp_path), 0)
    store.commit(None, _version(store, None, 0, ""))
    for version in (1, 2):
        current, tag = store.manifest_tagged()
        store.commit(current, _version(store, current, version, f"{version:08x}"), expected=tag)
    assert store.manifest().version == 2


def test_a_conditional_write_refuses_a_changed_or_created_object(tmp_path):
    storage = Storage(tmp_path)
    storage.write_if("x.json", b"1", None)  # create: only if absent
    with pytest.raises(PreconditionFailed):
        storage.write_if("x.json", b"2", None)
    _, tag = storage.read_tagged("x.json")
    storage.write_bytes("x.json", b"3")  # someone else replaced it
    with pytest.raises(PreconditionFailed):
        storage.write_if("x.json", b"4", tag)
    assert storage.read_bytes("x.json") == b"3"


def test_the_release_that_excluded_ids_is_found_from_the_manifest():
    manifest = Manifest(0, 3, [], [5, 6, 7], [{"version": 0}, {"version": 1, "ids": [5], "from_stage": 2},
                                               {"version": 2, "ids": [6, 7], "from_stage": 0}, {"version": 3, "ids": [9]}])
    assert manifest.release_without([5])["version"] == 1
    assert manifest.release_without([5, 7])["version"] == 2  # the first version without all of them
    assert manifest.release_without([8]) is None
    assert Manifest(0, 1, [], [5], [{"version": 0}, {"version": 1}]).release_without([5]) is None  # before ids were recorded
