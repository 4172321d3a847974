"""The s3_store fixture gives a working S3 store through pyarrow.fs.FileSystem.from_uri alone (AWS_ENDPOINT_URL)."""
from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pytest


def test_from_uri_alone_writes_lists_overwrites_and_deletes_objects_in_fixture_bucket(s3_store):
    assert s3_store.bucket_uri == "s3://dpsisa-test"
    assert s3_store.endpoint.startswith("http://127.0.0.1:")
    prefix_uri = f"{s3_store.bucket_uri}/{uuid.uuid4().hex}"
    fs, prefix = pafs.FileSystem.from_uri(prefix_uri)
    key = f"{prefix}/x.bin"

    with fs.open_output_stream(key) as f:
        f.write(b"first")
    with fs.open_input_stream(key) as f:
        assert f.read() == b"first"

    listed = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    assert [(i.path, i.type, i.size) for i in listed] == [(key, pafs.FileType.File, 5)]

    with fs.open_output_stream(key) as f:  # one PUT replaces the object
        f.write(b"second!")
    with fs.open_input_stream(key) as f:
        assert f.read() == b"second!"

    fs.delete_file(key)
    assert fs.get_file_info(key).type == pafs.FileType.NotFound
    assert fs.get_file_info(pafs.FileSelector(prefix, allow_not_found=True)) == []


def test_a_stale_writer_cannot_commit_a_shard_manifest_on_s3(s3_store):
    """The fenced commit on S3: a conditional PUT (If-Match on the ETag the replay read) through boto3.
    moto does not make check-and-write atomic across its threads, so the stale commit is ordered after
    the winning one here."""
    from pipeline.core.checkpoints import Manifest, ShardStore, StaleCommit
    from pipeline.fs import PreconditionFailed, Storage

    store = ShardStore(Storage(f"{s3_store.bucket_uri}/{uuid.uuid4().hex}"), 0)

    def version(old, number: int, writer: str) -> Manifest:
        entries = [store.write_stage(0, number, {"ids_digest": "d", "samples": 1, "w": number}, writer)]
        data = store.write_data(number, [1], [[0.0]], [0], writer)
        return Manifest(0, number, entries, [], (old.releases if old else []) + [{"version": number}], data)

    store.commit(None, version(None, 0, ""))
    (read_a, tag_a), (read_b, tag_b) = store.manifest_tagged(), store.manifest_tagged()
    assert tag_a == tag_b and tag_a.startswith('"')  # an S3 ETag
    a = version(read_a, 1, "aaaaaaaa")
    store.commit(read_a, a, expected=tag_a)
    objects = set(store.storage.list())
    with pytest.raises(StaleCommit):
        store.commit(read_b, version(read_b, 1, "bbbbbbbb"), expected=tag_b)
    assert store.manifest().to_dict() == a.to_dict() and set(store.storage.list()) == objects
    with pytest.raises(PreconditionFailed):  # create-only (If-None-Match: *) refuses an existing object
        store.storage.write_if("manifest.json", b"{}", None)


def test_a_reader_sees_the_old_or_the_new_object_whole_while_a_writer_replaces_it_on_s3(s3_store):
    """Objects are replaced by other processes while a run is read (the ledger, manifests): every read
    is one object version, never the old object's length filled from the new one's bytes."""
    import threading

    from pipeline.fs import Storage

    store = Storage(f"{s3_store.bucket_uri}/{uuid.uuid4().hex}")
    versions = [bytes([n]) * (200 + 7919 * n) for n in range(6)]  # every version a different length
    store.write_bytes("obj", versions[0])
    stop, torn = threading.Event(), []

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            store.write_bytes("obj", versions[n % len(versions)])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        for _ in range(300):
            data = store.read_bytes("obj")
            if data not in versions:
                torn.append((len(data), data[:1], data[-1:]))
    finally:
        stop.set()
        writer.join(10)
    assert torn == []
