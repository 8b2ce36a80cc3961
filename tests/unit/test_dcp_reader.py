import io
import pickle
import zipfile

import pytest
import torch

from spotwise.worker.runtime.dcp_reader import load_tensor


def _saved(t):
    b = io.BytesIO()
    torch.save(t, b)
    return bytearray(b.getvalue())


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12.0).view(3, 4)[1:],  # a view with a storage offset
        torch.randn(5, 7).t(),  # non-contiguous strides
        torch.zeros(5, dtype=torch.bfloat16),
        torch.tensor(3.5),  # 0-d
        torch.empty(0, 4),
        torch.arange(10, dtype=torch.int64)[2:9:3],
        torch.randint(0, 255, (33,), dtype=torch.uint8),
    ],
)
def test_round_trips_exactly(tensor):
    got = load_tensor(_saved(tensor))
    assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_calls_anything_else_is_not_executed(tmp_path, monkeypatch):
    # Build a torch.save-shaped archive whose data.pkl calls os.system.
    src = zipfile.ZipFile(io.BytesIO(bytes(_saved(torch.zeros(2)))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            data = pickle.dumps(_Evil(), protocol=2) if name.endswith("data.pkl") else src.read(name)
            z.writestr(name, data)
    called = []
    monkeypatch.setattr("os.system", lambda cmd: called.append(cmd))
    # The restricted unpickler refuses; torch.load (weights_only) refuses too.
    with pytest.raises(pickle.UnpicklingError):
        load_tensor(bytearray(out.getvalue()))
    assert called == []


def test_not_an_archive_falls_back_to_torch_load_which_refuses():
    with pytest.raises(Exception) as err:
        load_tensor(bytearray(64))
    assert not isinstance(err.value, AssertionError)


def test_real_dcp_items_take_the_fast_path_not_torch_load(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from spotwise.worker.runtime.dcp_reader import LocalReader

    # Tensors only: DCP loads non-tensor values with torch.load itself (patched here too).
    saved = {"w": torch.randn(64, 32), "b": torch.arange(7, dtype=torch.int32)}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    target = {"w": torch.zeros(64, 32), "b": torch.zeros(7, dtype=torch.int32)}

    def no_torch_load(*args, **kwargs):
        raise AssertionError("tensor items must not need torch.load")

    monkeypatch.setattr("spotwise.worker.runtime.dcp_reader.torch.load", no_torch_load)
    dcp.load(target, storage_reader=LocalReader(str(tmp_path)))
    assert torch.equal(target["w"], saved["w"]) and torch.equal(target["b"], saved["b"])
