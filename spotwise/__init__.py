"""spotwise: fault-tolerant elastic PyTorch training on spot clouds.

The user-facing surface: `spotwise.Client` (the daemon's job API) and `spotwise.JobSpec`
(the validated job spec). Both are imported on first use, so `import spotwise` stays cheap
for the training runtime and the agent, which need neither grpc nor pydantic at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spotwise.client import (
        Client,
        ClientConfigError,
        DaemonUnavailable,
        InvalidSpec,
        JobNotFound,
        PermissionDenied,
        RequestFailed,
        SpotwiseError,
        WatchInterrupted,
    )
    from spotwise.spec import JobSpec, SpecError

_LAZY = {
    "Client": "spotwise.client",
    "SpotwiseError": "spotwise.client",
    "ClientConfigError": "spotwise.client",
    "DaemonUnavailable": "spotwise.client",
    "JobNotFound": "spotwise.client",
    "InvalidSpec": "spotwise.client",
    "PermissionDenied": "spotwise.client",
    "RequestFailed": "spotwise.client",
    "WatchInterrupted": "spotwise.client",
    "JobSpec": "spotwise.spec",
    "SpecError": "spotwise.spec",
}

__all__ = [
    "Client",
    "ClientConfigError",
    "DaemonUnavailable",
    "InvalidSpec",
    "JobNotFound",
    "JobSpec",
    "PermissionDenied",
    "RequestFailed",
    "SpecError",
    "SpotwiseError",
    "WatchInterrupted",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spotwise' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
