"""Reading a DCP checkpoint's `.metadata` and non-tensor items without running anything in them.

DCP writes `.metadata` with `pickle.dump` and each non-tensor item (an int, a scheduler's
state) with `torch.save`, and reads them back with `pickle.load` and
`torch.load(weights_only=False)`: a planted file then runs whatever it names. Whoever can write
the bucket is not trusted with the fleet, so spotwise keeps DCP's format (any DCP tool still
reads a spotwise checkpoint) and reads it differently:

- `.metadata` goes through an unpickler that builds only DCP's own metadata classes and the
  few torch values they hold (torch.Size, dtypes, layouts, memory formats), and the result is
  then checked for the shape DCP gives it (every storage file a plain name in the checkpoint's
  own folder);
- a non-tensor item goes through `torch.load(weights_only=True)`, torch's allow-listed loader of
  plain containers, numbers, strings and tensors.

Anything else raises `NotAPlainCheckpoint`, whose message is one line naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata


class NotAPlainCheckpoint(ValueError):
    """A checkpoint file holds something a checkpoint written by DCP never holds."""


def _metadata_classes() -> dict[tuple[str, str], Any]:
    """DCP's metadata types as this torch version defines them (2.11 to 2.13 differ in which
    fields they carry, not in where the classes live): every dataclass and enum of
    torch.distributed.checkpoint.metadata, and the filesystem storage layout's _StorageInfo."""
    allowed: dict[tuple[str, str], Any] = {}
    module = dcp_metadata.__name__
    for name, value in vars(dcp_metadata).items():
        if isinstance(value, type) and value.__module__ == module and (
            dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)
        ):
            allowed[(module, name)] = value
    info = dcp_filesystem._StorageInfo
    allowed[(info.__module__, info.__name__)] = info
    allowed[("torch", "Size")] = torch.Size
    # StorageMeta.checkpoint_id is the path the local writer was given.
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("pathlib", "PurePosixPath")] = pathlib.PurePosixPath
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # torch.float32 and friends pickle as a global lookup of their name in module torch.
    layouts: dict[str, torch.layout] = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
        if isinstance(value, torch.layout):
            layouts[str(value)] = value

    def layout_named(name: str) -> torch.layout:
        # torch pickles a layout as torch.serialization._get_layout("torch.strided"); this is
        # that lookup and nothing else.
        try:
            return layouts[name]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"it names an unknown layout {name!r}") from None

    allowed[("torch.serialization", "_get_layout")] = layout_named
    return allowed


_ALLOWED = _metadata_classes()


class _MetadataUnpickler(pickle.Unpickler):
    """The C unpickler, allowed to name only DCP's metadata classes and torch's plain values.

    Building an allowed class runs only its own constructor or __setstate__ (DCP's
    dataclasses and enums), so nothing named by the file itself can be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP metadata never holds")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _check_shape(md: Any) -> None:
    """Raise UnpicklingError unless `md` is laid out as DCP writes it."""
    if not isinstance(md, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"it holds a {type(md).__name__}, not DCP Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not all(
        isinstance(k, str)
        and isinstance(v, (dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata))
        for k, v in md.state_dict_metadata.items()
    ):
        raise pickle.UnpicklingError("its state_dict_metadata is not a map of names to storage metadata")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise pickle.UnpicklingError("its storage_data is not a map")
    for index, info in storage.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, dcp_filesystem._StorageInfo):
            raise pickle.UnpicklingError("its storage_data holds something other than DCP's storage layout")
        # Reads open relative_path inside the checkpoint's folder: a path that leaves it would
        # read another job's files (or anything the process can open).
        if not _plain_name(info.relative_path):
            raise pickle.UnpicklingError(f"it points item {index.fqn!r} at {info.relative_path!r}, outside its folder")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length)):
            raise pickle.UnpicklingError(f"item {index.fqn!r} has a malformed offset or length")


def load_metadata(raw: bytes, *, where: str) -> dcp_metadata.Metadata:
    """Parse a `.metadata` file's bytes. Raises NotAPlainCheckpoint naming `where`."""
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
        _check_shape(md)
    # Whatever a malformed pickle makes the unpickler raise, the answer is the same refusal.
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        raise NotAPlainCheckpoint(f"refusing {where}: not a plain DCP checkpoint file ({telling_line(exc)})") from None
    return md


def load_item(data: bytes | bytearray, *, fqn: str, where: str) -> Any:
    """Load one non-tensor item (torch.save'd plain data). Raises NotAPlainCheckpoint."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, ValueError, AttributeError) as exc:
        if is_refusal(exc):
            raise NotAPlainCheckpoint(
                f"refusing {where}: item {fqn!r} is not plain data ({telling_line(exc)})"
            ) from None
        # Damaged rather than planted: the caller reports the checkpoint as unreadable.
        raise ValueError(f"{where}: item {fqn!r} is unreadable ({telling_line(exc)})") from None


def is_refusal(exc: BaseException) -> bool:
    """Whether torch.load(weights_only=True) failed because the pickle names something it may
    not build (planted: "unsupported GLOBAL posix.system"), rather than because the bytes are
    damaged ("Unsupported operand 0")."""
    return any("unsupported global" in line.lower() for line in str(exc).splitlines())


def telling_line(exc: BaseException) -> str:
    """The telling line of an unpickling error (torch's weights_only errors are a page long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "unsupported global" in line.lower() or "unsupported operand" in line.lower():
            return line.split("WeightsUnpickler error:")[-1].strip()
    return lines[0] if lines else type(exc).__name__


def refusal_in(exc: BaseException | tuple | None) -> NotAPlainCheckpoint | None:
    """The NotAPlainCheckpoint inside a (DCP-wrapped) failure, if that is what it was.

    DCP wraps each rank's exception in a CheckpointException keyed by rank, as (exception,
    traceback) pairs; the refusal's one line is what the caller should show.
    """
    if isinstance(exc, tuple):
        exc = exc[0] if exc else None
    if exc is None:
        return None
    if isinstance(exc, NotAPlainCheckpoint):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            found = refusal_in(failure)
            if found is not None:
                return found
    return refusal_in(exc.__cause__) if exc.__cause__ is not None else None
