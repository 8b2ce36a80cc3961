"""Checkpoints on S3 (a moto server over HTTP on loopback): round trip, torn data, fencing."""

import os

import boto3
import pytest
import torch
import torch.distributed.checkpoint as dcp

from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
from tests.support.launch import TINY, checked, torchrun
from tests.support.s3 import make_bucket, moto_s3
from tests.test_checkpoint_common import assert_equal_state


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as env:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        make_bucket(env, "ckpt")
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _client(env):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")


def _keys(env, prefix):
    resp = _client(env).list_objects_v2(Bucket="ckpt", Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


def _checkpointer(uri, generation=0, **kw):
    return Checkpointer(
        CheckpointConfig(uri=uri, async_mode="sync", **kw),
        rank=0, world_size=1, generation=generation, device=torch.device("cpu"),
    )


def _state(step):
    return {"model": {"w": torch.arange(1000, dtype=torch.float32) * step}, "trainer": {"step": step}}


@pytest.mark.slow
def test_round_trip_through_s3_reshards_bit_exact(s3, tmp_path):
    env = {"SPOTWISE_CHECKPOINT_URI": "s3://ckpt/roundtrip", "SPOTWISE_CHECKPOINT_EVERY": "2"}
    checked(torchrun(TINY, 2, "--steps", "4", "--save-full-end", str(tmp_path / "full.pt"), env=env))
    assert any(k.startswith("roundtrip/manifests/step-0000000004") for k in _keys(s3, "roundtrip/"))
    checked(torchrun(TINY, 1, "--steps", "4", "--save-full", str(tmp_path / "r.pt"), env=env))
    assert_equal_state(torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "r.pt"))


def test_shards_without_manifest_are_not_a_checkpoint(s3):
    ck = _checkpointer("s3://ckpt/torn1")
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    # A save whose manifest never came: the data is all there, but it is no checkpoint.
    dcp.save(_state(4), storage_writer=ck._writer("s3://ckpt/torn1/data/step-0000000004-g0"))
    assert ck.choose(None).step == 2


def test_truncated_shard_is_never_restored(s3):
    ck = _checkpointer("s3://ckpt/torn2", keep=5)
    for step in (2, 4):
        ck.save(step, _state(step), cursor=10 * step, blocking=True)
    shard = next(k for k in _keys(s3, "torn2/data/step-0000000004") if k.endswith(".distcp"))
    body = _client(s3).get_object(Bucket="ckpt", Key=shard)["Body"].read()
    _client(s3).put_object(Bucket="ckpt", Key=shard, Body=body[: len(body) // 2])
    # The newest valid one is chosen instead...
    assert ck.choose(None).step == 2
    # ...and asking for the torn one by name is a clear error.
    with pytest.raises(CheckpointError, match="torn: .* is \\d+ bytes, the manifest says \\d+"):
        ck.choose(4)


def test_a_newer_generation_commits_the_same_step_under_its_own_key(s3):
    first = _checkpointer("s3://ckpt/twice")
    assert first.save(6, _state(6), cursor=60, blocking=True)
    # A newer generation restored an older step (say 6 looked torn) and replayed up to step 6
    # again: its commit carries its own generation, so neither blocks the other...
    second = _checkpointer("s3://ckpt/twice", generation=1)
    assert second.save(6, _state(7), cursor=61, blocking=True)
    # ...and the newest generation's is the one restored.
    m = first.choose(None)
    assert (m.step, m.generation, m.cursor) == (6, 1, 61)
    assert [(c.step, c.generation) for c in first.committed()] == [(6, 0), (6, 1)]


def test_an_older_generation_cannot_commit_after_a_newer_one_started(s3):
    refused = []
    old = _checkpointer("s3://ckpt/fence", generation=3)
    old.on_fenced = lambda step, reason: refused.append(step)
    _checkpointer("s3://ckpt/fence", generation=4)  # the job moved on
    assert not old.save(9, _state(9), cursor=90, blocking=True)
    assert refused == [9]
    assert old.choose(None) is None


@pytest.mark.slow
def test_missing_bucket_is_a_clear_error(s3):
    r = torchrun(TINY, 1, "--steps", "1", env={"SPOTWISE_CHECKPOINT_URI": "s3://no-such-bucket/x"})
    assert r.returncode != 0
    assert "spotwise: error: S3 bucket 'no-such-bucket' does not exist" in r.stdout


def test_the_requested_step_is_a_floor_storage_has_the_newest_commit(s3):
    ck = _checkpointer("s3://ckpt/pruned", keep=5)
    for step in (2, 4):
        ck.save(step, _state(step), cursor=10 * step, blocking=True)
    # The daemon chose step 2, not having heard of 4 (its report died with its node).
    assert ck.choose(2).step == 4
    # The old generation committed 4 and its pruning removed 2.
    ck.fs.rm(ck._manifest_path(2))
    assert ck.choose(2).step == 4
    # Nothing newer than what was asked: an error, never a silent fresh start or an older step.
    with pytest.raises(CheckpointError, match="no manifest at .*step-0000000006"):
        ck.choose(6)
