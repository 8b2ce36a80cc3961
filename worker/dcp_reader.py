"""DCP storage readers that load tensor items without torch.load's per-item unpickling cost.

DCP stores each tensor chunk as a small torch.save archive and reads it back with
``torch.load(weights_only=True)``, whose pure-Python unpickler costs a fraction of a millisecond
per item. A checkpoint saved at more ranks has more, smaller chunks, so that cost is what makes a
resharding restore slower than a same-size one. These readers parse the archive with the C
unpickler restricted to exactly what a saved tensor contains (the rebuild function, a typed
storage, OrderedDict), so nothing else can be called; anything unexpected falls back to
torch.load. Everything else is DCP's own FileSystemReader / FsspecReader.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import warnings
import zipfile
from typing import IO, Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future


def _storage_dtypes() -> dict[str, torch.dtype]:
    out = {}
    with warnings.catch_warnings():  # typed storages are deprecated, but pickles name them
        warnings.simplefilter("ignore")
        for name in dir(torch):
            if name.endswith("Storage") and name not in ("UntypedStorage", "TypedStorage"):
                dtype = getattr(getattr(torch, name), "dtype", None)
                if isinstance(dtype, torch.dtype):
                    out[name] = dtype
    return out


_STORAGE_DTYPES = _storage_dtypes()


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild(flat: torch.Tensor, offset: int, size: tuple, stride: tuple, _requires_grad: bool, _hooks: Any) -> torch.Tensor:
    return flat.as_strided(size, stride, offset)


class _TensorUnpickler(pickle.Unpickler):
    """The C unpickler, allowed to build only a tensor over storages read from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tensor item")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        buf = bytearray(int(numel) * storage_type.dtype.itemsize)
        if buf:
            _read_stored(self.archive, f"{self.prefix}/data/{key}", buf)
            return torch.frombuffer(buf, dtype=storage_type.dtype)
        return torch.empty(0, dtype=storage_type.dtype)


_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's own layout of a local file header


def _read_stored(archive: zipfile.ZipFile, name: str, buf: bytearray) -> None:
    """Read an uncompressed entry straight into `buf`: one read, no CRC pass over the bytes.

    torch.save writes tensor data uncompressed; anything else is refused (and torch.load used).
    Integrity comes from the manifest's sizes and DCP's metadata, as with torch.load, which does
    not check CRCs either.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != len(buf):
        raise pickle.UnpicklingError(f"{name}: not a stored entry of {len(buf)} bytes")
    fp = archive.fp
    fp.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(fp.read(_LOCAL_HEADER.size))
    if header[0] != zipfile.stringFileHeader:
        raise pickle.UnpicklingError(f"{name}: bad local header")
    fp.seek(info.header_offset + _LOCAL_HEADER.size + header[10] + header[11])
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = fp.readinto(view[got:])
        if not n:
            raise pickle.UnpicklingError(f"{name}: truncated")
        got += n


def load_tensor(stream: IO[bytes]) -> torch.Tensor:
    """Load one torch.save'd tensor from a seekable stream (fast path, else torch.load)."""
    start = stream.tell()
    try:
        archive = zipfile.ZipFile(stream)
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        order = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() else "little"
        if order != sys.byteorder:
            raise pickle.UnpicklingError("byte order differs")
        tensor = _TensorUnpickler(archive.read(pkl), archive, prefix).load()
        if not isinstance(tensor, torch.Tensor):
            raise pickle.UnpicklingError("not a tensor")
        return tensor
    except (pickle.UnpicklingError, zipfile.BadZipFile, StopIteration, KeyError, ValueError, RuntimeError):
        # Not the plain layout this path knows: let torch.load decide (and raise if it is bad).
        stream.seek(start)
        return cast(torch.Tensor, torch.load(stream, map_location="cpu", weights_only=True))


class _FastTensorReads:
    """read_data as in DCP's FileSystemReader, with load_tensor in place of torch.load."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list] = {}
        for read_item in plan.items:
            per_file.setdefault(self.storage_data[read_item.storage_index].relative_path, []).append(read_item)
        for relative_path, reqs in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    item_md = self.storage_data[req.storage_index]
                    file_slice = self._slice_file(stream, item_md)
                    if item_md.transform_descriptors:
                        source = self.transforms.transform_load_stream(req, item_md.transform_descriptors, file_slice)
                    else:
                        # One read of the whole item (one ranged GET on S3). DCP's file view
                        # also mis-seeks from its end, which zipfile needs.
                        source = io.BytesIO(file_slice.read(item_md.length))
                    if req.type == LoadItemType.BYTE_IO:
                        read_bytes = io.BytesIO(source.read(-1))
                        read_bytes.seek(0)
                        planner.load_bytes(req, read_bytes)
                        continue
                    if not source.seekable():
                        source = io.BytesIO(source.read(-1))
                    tensor = narrow_tensor_by_index(load_tensor(source), req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut


class LocalReader(_FastTensorReads, FileSystemReader):
    """FileSystemReader with fast tensor loads."""


class RemoteReader(_FastTensorReads, FsspecReader):
    """FsspecReader (s3:// and other fsspec URIs) with fast tensor loads."""
