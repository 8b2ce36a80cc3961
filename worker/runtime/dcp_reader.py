"""DCP storage readers that load tensor items without torch.load's per-item unpickling cost.

DCP stores each tensor chunk as a small torch.save archive and reads it back with
``torch.load(weights_only=True)``, whose pure-Python unpickler costs a fraction of a millisecond
per item. A checkpoint saved at more ranks has more, smaller chunks, so that cost is what makes a
resharding restore slower than a same-size one. These readers parse the archive with the C
unpickler restricted to exactly what a saved tensor contains (the rebuild function, a typed
storage, OrderedDict), so nothing else can be called; anything unexpected falls back to
torch.load(weights_only=True). `.metadata` and non-tensor items are read by dcp_safety's
restricted loaders instead of DCP's pickle.load and torch.load(weights_only=False), so a planted
file is refused rather than run. Everything else is DCP's own FileSystemReader / FsspecReader.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import warnings
from typing import Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from spotwise.worker.runtime.dcp_safety import (
    NotAPlainCheckpoint,
    is_refusal,
    load_item,
    load_metadata,
    telling_line,
)

# A .metadata larger than this is not one DCP wrote for a model spotwise trains (a 70B model's
# is a few MiB); reading it whole would only let a planted file exhaust memory.
MAX_METADATA_BYTES = 256 * 1024 * 1024


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

    def __init__(self, archive: _Archive) -> None:
        super().__init__(io.BytesIO(archive.entry("data.pkl")))
        self.archive = archive

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
        nbytes = int(numel) * storage_type.dtype.itemsize
        if nbytes == 0:
            return torch.empty(0, dtype=storage_type.dtype)
        view = self.archive.entry_view(f"data/{key}", nbytes)
        return torch.frombuffer(view, dtype=storage_type.dtype)


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_CDIR = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header


class _Archive:
    """The entries of one torch.save zip archive held in memory (a writable buffer).

    A few struct reads instead of zipfile's objects and CRC pass; only stored (uncompressed)
    entries, which is what torch.save writes. Anything else raises UnpicklingError.
    """

    def __init__(self, buf: bytearray) -> None:
        self.buf = memoryview(buf)
        if len(buf) < _EOCD.size:
            raise pickle.UnpicklingError("too short for a zip archive")
        end = _EOCD.unpack_from(buf, len(buf) - _EOCD.size)
        if end[0] != b"PK\x05\x06":
            raise pickle.UnpicklingError("no end of central directory (zip64 or a comment)")
        count, cd_offset = end[4], end[6]
        self.entries: dict[str, tuple[int, int]] = {}
        pos = cd_offset
        for _ in range(count):
            h = _CDIR.unpack_from(buf, pos)
            if h[0] != b"PK\x01\x02" or h[4] != 0:  # signature; compression method 0 = stored
                raise pickle.UnpicklingError("unexpected central directory entry")
            size, name_len, extra_len, comment_len, local_offset = h[8], h[10], h[11], h[12], h[16]
            name = bytes(buf[pos + _CDIR.size : pos + _CDIR.size + name_len]).decode()
            loc = _LOCAL.unpack_from(buf, local_offset)
            if loc[0] != b"PK\x03\x04":
                raise pickle.UnpicklingError("bad local header")
            start = local_offset + _LOCAL.size + loc[9] + loc[10]
            self.entries[name.split("/", 1)[-1]] = (start, size)
            pos += _CDIR.size + name_len + extra_len + comment_len

    def entry_view(self, name: str, nbytes: int | None = None) -> memoryview:
        if name not in self.entries:
            raise pickle.UnpicklingError(f"no entry {name}")
        start, size = self.entries[name]
        if (nbytes is not None and size != nbytes) or start + size > len(self.buf):
            raise pickle.UnpicklingError(f"entry {name} has {size} bytes, expected {nbytes}")
        return self.buf[start : start + size]

    def entry(self, name: str) -> bytes:
        return bytes(self.entry_view(name))


def load_tensor(data: bytearray) -> torch.Tensor:
    """Load one torch.save'd tensor from its bytes (fast path, else torch.load).

    The tensor shares `data`'s memory (no copy); callers copy it into its destination.
    """
    try:
        archive = _Archive(data)
        order = archive.entry("byteorder").decode() if "byteorder" in archive.entries else "little"
        if order != sys.byteorder:
            raise pickle.UnpicklingError("byte order differs")
        tensor = _TensorUnpickler(archive).load()
        if not isinstance(tensor, torch.Tensor):
            raise pickle.UnpicklingError("not a tensor")
        return tensor
    except (pickle.UnpicklingError, struct.error, UnicodeDecodeError, KeyError, ValueError, RuntimeError, IndexError):
        # Not the plain layout this path knows: let torch.load decide (and raise if it is bad).
        return cast(torch.Tensor, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


class _SafeReads:
    """read_metadata and read_data as in DCP's FileSystemReader, with the restricted loaders of
    dcp_safety in place of pickle.load and torch.load(weights_only=False), and load_tensor in
    place of torch.load for tensors."""

    refused: NotAPlainCheckpoint | None = None
    """The refusal of the last read, kept because DCP folds a reader's exceptions into its own
    (as text, in some versions): the caller reports this one line instead."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            return self._read_metadata(kwargs.get("rank"))
        except NotAPlainCheckpoint as exc:
            self.refused = exc
            raise

    def _read_metadata(self, rank: int | None) -> Metadata:
        if hasattr(self, "_get_metadata_path"):  # torch >= 2.12 may keep one .metadata per rank
            path = self._get_metadata_path(rank)
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
        if len(raw) > MAX_METADATA_BYTES:
            raise NotAPlainCheckpoint(f"refusing {path}: larger than {MAX_METADATA_BYTES} bytes")
        metadata = load_metadata(raw, where=str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read_data(plan, planner)
        except NotAPlainCheckpoint as exc:
            self.refused = exc
            raise
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_data(self, plan: LoadPlan, planner: LoadPlanner) -> None:
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
                        data = bytearray(source.read(-1))
                    else:
                        # One read of the whole item (one ranged GET on S3) into a writable
                        # buffer the tensor can share.
                        data = bytearray(item_md.length)
                        view, got = memoryview(data), 0
                        while got < len(data):
                            n = file_slice.readinto(view[got:])
                            if not n:
                                raise OSError(f"{relative_path}: item ends after {got} of {len(data)} bytes")
                            got += n
                    if req.type == LoadItemType.BYTE_IO:
                        where = str(self.fs.concat_path(self.path, relative_path))
                        value = load_item(data, fqn=req.dest_index.fqn, where=where)
                        # The planner unpickles what it is given with weights_only=False; it
                        # gets the value re-saved from what the restricted loader built, never
                        # the file's own bytes, so no difference between the two unpicklers
                        # can be used to slip anything past the check.
                        clean = io.BytesIO()
                        torch.save(value, clean)
                        clean.seek(0)
                        planner.load_bytes(req, clean)
                        continue
                    try:
                        loaded = load_tensor(data)
                    except pickle.UnpicklingError as exc:
                        if not is_refusal(exc):
                            raise  # damaged rather than planted: reported as unreadable
                        where = self.fs.concat_path(self.path, relative_path)
                        raise NotAPlainCheckpoint(
                            f"refusing {where}: tensor item {req.dest_index.fqn!r} is not a plain tensor "
                            f"({telling_line(exc)})"
                        ) from None
                    tensor = narrow_tensor_by_index(loaded, req.storage_offsets, req.lengths)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise AssertionError(f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)


class LocalReader(_SafeReads, FileSystemReader):
    """FileSystemReader with restricted metadata and item loads and fast tensor loads."""


class RemoteReader(_SafeReads, FsspecReader):
    """FsspecReader (s3:// and other fsspec URIs) with restricted and fast loads."""
