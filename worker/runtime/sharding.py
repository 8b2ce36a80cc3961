"""FSDP2 sharding: each block, then the root, with bf16 compute on GPU."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 parameters with fp32 gradient reduction on GPU; full fp32 on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: nn.Module, *, mesh: DeviceMesh, blocks: Iterable[nn.Module], device: torch.device) -> nn.Module:
    """Shard `model` in place with fully_shard per block, then the root; returns it."""
    model.to(device)
    kwargs = {"mesh": mesh}
    mp = mixed_precision(device)
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
