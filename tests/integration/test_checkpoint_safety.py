"""What a planted checkpoint can do on restore: nothing runs, nothing outside the job is deleted.

Each attack is written the way whoever can write the bucket could write it: a `.metadata` or a
non-tensor item that would create a marker file when unpickled, a manifest whose `data` points
out of the job's folder. Each must fail with one line naming the file and leave the marker file
absent and the victim's files in place.
"""

import json
import os
import pickle
import pickletools

import pytest
import torch

from spotwise.worker.runtime.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    Manifest,
)
from spotwise.worker.runtime.dcp_safety import NotAPlainCheckpoint, load_metadata


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpointer(root, *, generation=0, keep=3):
    return Checkpointer(
        CheckpointConfig(uri=str(root), async_mode="sync", keep=keep),
        rank=0, world_size=1, generation=generation, device=torch.device("cpu"),
    )


def _state(step, **extra):
    trainer = {"step": step, "cursor": 10 * step, "rng": torch.get_rng_state(), **extra}
    return {"model": {"w": torch.arange(64, dtype=torch.float32) * step}, "trainer": trainer}


def _template(**extra):
    return {"model": {"w": torch.zeros(64)}, "trainer": {"step": 0, "cursor": 0, "rng": torch.zeros_like(torch.get_rng_state()), **extra}}


def _rewrite_manifest(ck, m, **changes):
    """Write the manifest an attacker who can write the bucket would write."""
    path = ck._manifest_path(m.step)
    doc = json.loads(ck.fs.cat_file(path))
    doc.update(changes)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_a_genuine_checkpoint_restores_bit_exactly_through_the_restricted_readers(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    saved = _state(4, scheduler={"last_epoch": 4, "base_lrs": [0.1, 0.01], "_last_lr": [0.05, 0.005]})
    assert ck.save(4, saved, cursor=40, blocking=True)
    got = _template(scheduler={"last_epoch": 0, "base_lrs": [0.0, 0.0], "_last_lr": [0.0, 0.0]})
    m = ck.choose(None)
    ck.load(got, m)
    assert torch.equal(got["model"]["w"], saved["model"]["w"])
    assert torch.equal(got["trainer"]["rng"], saved["trainer"]["rng"])
    assert (got["trainer"]["step"], got["trainer"]["cursor"]) == (4, 40)
    assert got["trainer"]["scheduler"] == saved["trainer"]["scheduler"]


def test_a_genuine_metadata_names_only_allowed_classes(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    raw = (tmp_path / "ck" / "data" / "step-0000000002-g0" / ".metadata").read_bytes()
    # Parsed by the restricted unpickler, and it names DCP's classes (the list is not empty by
    # accident: a genuine file exercises it).
    md = load_metadata(raw, where="x")
    assert set(md.state_dict_metadata) >= {"model.w", "trainer.step", "trainer.rng"}
    names = {arg for op, arg, _ in pickletools.genops(raw) if op.name in ("SHORT_BINUNICODE", "BINUNICODE") and arg and "." in arg}
    assert "torch.distributed.checkpoint.metadata" in names


def test_a_planted_metadata_never_executes_and_the_refusal_names_the_file(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    m = ck.choose(None)
    metadata = tmp_path / "ck" / m.data / ".metadata"
    marker = tmp_path / "pwned"
    metadata.write_bytes(pickle.dumps(_Payload(marker)))
    # The attacker fixes up the manifest's file sizes too, so the checkpoint is not merely torn.
    files = dict(m.files, **{".metadata": metadata.stat().st_size})
    _rewrite_manifest(ck, m, files=files, bytes=sum(files.values()))
    planted = ck.choose(None)
    with pytest.raises(CheckpointError) as err:
        ck.load(_template(), planted)
    assert not marker.exists()
    line = str(err.value)
    assert "\n" not in line and str(metadata) in line and "posix.system" in line, line


def test_a_malicious_bytes_item_in_a_genuine_save_never_executes(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    marker = tmp_path / "pwned"
    # A job (or anyone who can write the bucket) saves an object whose unpickling runs code;
    # DCP writes it as a non-tensor item of an otherwise genuine, committed checkpoint.
    assert ck.save(2, _state(2, hook=_Payload(marker)), cursor=20, blocking=True)
    assert not marker.exists()
    m = ck.choose(None)
    with pytest.raises(CheckpointError) as err:
        ck.load(_template(hook=None), m)
    assert not marker.exists()
    line = str(err.value)
    assert "\n" not in line and "'trainer.hook' is not plain data" in line and str(tmp_path / "ck" / m.data) in line, line


def test_metadata_pointing_reads_outside_its_folder_is_refused(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    m = ck.choose(None)
    path = tmp_path / "ck" / m.data / ".metadata"
    md = load_metadata(path.read_bytes(), where="x")
    for info in md.storage_data.values():
        info.relative_path = "../../../other-job/data/__0_0.distcp"
    with pytest.raises(NotAPlainCheckpoint, match="outside its folder"):
        load_metadata(pickle.dumps(md), where=str(path))


@pytest.mark.parametrize(
    "data",
    ["../../victim", "data/../../victim", "/abs/victim", "data/step-0000000004-g0", "data/step-0000000002-g0/.."],
)
def test_a_traversal_manifest_deletes_nothing_outside_the_job(tmp_path, data):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    root = tmp_path / "jobs" / "job-a"
    ck = _checkpointer(root, keep=1)
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    _rewrite_manifest(ck, ck.choose(None), data=data)
    # The manifest is refused when read: it is no checkpoint, so nothing follows its path.
    with pytest.raises(CheckpointError, match="names data"):
        ck.read_manifest(ck._manifest_path(2))
    assert ck.choose(None) is None
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # Newer commits make the planted one the oldest: the prune that follows skips it.
    assert ck.save(4, _state(4), cursor=40, blocking=True)
    assert ck.save(6, _state(6), cursor=60, blocking=True)
    assert (victim / "precious").read_text() == "keep me"
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    outside = [p for p in before if not str(p).startswith("jobs")]
    assert all(p in after for p in outside)
    assert ck.choose(None).step == 6


def test_a_manifest_under_another_steps_name_is_refused(tmp_path):
    ck = _checkpointer(tmp_path / "ck")
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    m = ck.choose(None)
    os.rename(ck._manifest_path(2), ck._manifest_path(8))
    with pytest.raises(CheckpointError, match="not the step its name says"):
        ck.read_manifest(ck._manifest_path(8))
    assert Manifest.from_json(m.to_json(), where="x") == m


def test_a_data_folder_planted_as_a_link_is_not_followed_by_the_prune(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    root = tmp_path / "jobs" / "job-a"
    ck = _checkpointer(root, keep=1)
    assert ck.save(2, _state(2), cursor=20, blocking=True)
    # Step 1's folder, correctly named, is a link out of the job: older than every kept step.
    (root / "data" / "step-0000000001-g0").symlink_to(victim, target_is_directory=True)
    assert ck.save(4, _state(4), cursor=40, blocking=True)
    assert (victim / "precious").read_text() == "keep me"
    assert ck.choose(None).step == 4


def test_a_planted_tensor_item_is_refused_and_a_damaged_one_is_unreadable():
    import io
    import zipfile

    from spotwise.worker.runtime.dcp_reader import load_tensor
    from spotwise.worker.runtime.dcp_safety import is_refusal

    saved = io.BytesIO()
    torch.save(torch.zeros(2), saved)
    genuine = zipfile.ZipFile(io.BytesIO(saved.getvalue()))
    planted = io.BytesIO()
    with zipfile.ZipFile(planted, "w", zipfile.ZIP_STORED) as z:
        for name in genuine.namelist():
            z.writestr(name, pickle.dumps(_Payload("/nonexistent/x"), protocol=2) if name.endswith("data.pkl") else genuine.read(name))
    with pytest.raises(pickle.UnpicklingError) as err:
        load_tensor(bytearray(planted.getvalue()))
    assert is_refusal(err.value)
    with pytest.raises(pickle.UnpicklingError) as err:
        load_tensor(bytearray(len(saved.getvalue())))
    assert not is_refusal(err.value)


def test_a_start_from_scratch_still_restores_a_commit_the_daemon_never_heard_of(tmp_path):
    # Generation 1 commits step 5, but its report dies with it: the daemon starts generation 2
    # "from scratch" (restore step -1). Storage decides: generation 2 restores step 5, rather
    # than training again from step 0 beside a commit a later generation would come back to.
    old = _checkpointer(tmp_path / "ck", generation=1)
    assert old.save(5, _state(5), cursor=50, blocking=True)
    new = _checkpointer(tmp_path / "ck", generation=2)
    m = new.choose(-1)
    assert m is not None and (m.step, m.generation) == (5, 1)
    # On an empty location -1 is a start from scratch.
    assert _checkpointer(tmp_path / "empty", generation=2).choose(-1) is None
