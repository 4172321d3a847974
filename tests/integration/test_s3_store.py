"""The s3_store fixture gives a working S3 store through pyarrow.fs.FileSystem.from_uri alone (AWS_ENDPOINT_URL)."""
from __future__ import annotations

import uuid

import pyarrow.fs as pafs


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
