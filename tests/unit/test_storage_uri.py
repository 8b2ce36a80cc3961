import os

import pytest

from spotwise.worker.runtime.storage import AlreadyExists, filesystem, parse_uri, write_create_only


@pytest.mark.parametrize(
    "uri, scheme, root",
    [
        ("/tmp/ckpt", "file", "/tmp/ckpt"),
        ("file:///tmp/ckpt", "file", "/tmp/ckpt"),
        ("s3://my-bucket/jobs/a", "s3", "my-bucket/jobs/a"),
        ("s3://my-bucket", "s3", "my-bucket"),
        ("s3://my-bucket/jobs/a/", "s3", "my-bucket/jobs/a"),
    ],
)
def test_good_uris(uri, scheme, root):
    loc = parse_uri(uri)
    assert (loc.scheme, loc.root) == (scheme, root)


def test_relative_path_becomes_absolute():
    assert parse_uri("ckpt/x").root == os.path.abspath("ckpt/x")


@pytest.mark.parametrize(
    "uri, words",
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported URI scheme 'gs'"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://b/x?versionId=1", "'?' and '#' are not allowed"),
        ("file://host/x", "file:// takes no host"),
        (" /tmp/x", "whitespace"),
        ("s3://bucket/a//b", "empty or relative segment"),
    ],
)
def test_malformed_uris_say_what_is_wrong(uri, words):
    with pytest.raises(ValueError, match=words.replace("?", r"\?")):
        parse_uri(uri)


def test_create_only_write_refuses_the_second_writer(tmp_path):
    loc = parse_uri(str(tmp_path))
    fs = filesystem(loc)
    write_create_only(fs, loc.join("m.json"), b"first")
    with pytest.raises(AlreadyExists):
        write_create_only(fs, loc.join("m.json"), b"second")
    assert (tmp_path / "m.json").read_bytes() == b"first"
