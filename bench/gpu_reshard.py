"""Cross-device reshard for bench/gpu.py and its tests: save the example model on one set of
ranks and devices, restore it on another, and compare every tensor bit for bit.

A saving run trains the example language model (examples/train_lm.py's, parameters in bf16)
for a few steps through the spotwise Runtime, writes the full state it is about to checkpoint
to ``expected.pt`` (rank 0, CPU tensors), then lets ``Runtime.finish`` save and commit the
final step under ``checkpoint/``. A restoring run, at any world size and on either device,
restores that checkpoint through ``Runtime.restore`` and gathers the full state again: the two
must be equal in dtype and in every bit.

    spawn_ranks(save_rank, world_size=2, args=(folder, SMALL, "gloo"))     # CPU ranks save
    spawn_ranks(restore_rank, world_size=3, args=(folder, SMALL, "gloo"))  # 3 CPU ranks restore

Imports torch and the spotwise runtime only (it runs on GPU machines that lack the rest).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def import_spotwise_runtime() -> None:
    """Make ``spotwise.worker`` importable from this tree where spotwise is not installed.

    pyproject maps ``spotwise.worker`` to the top-level ``worker/`` folder; a plain checkout on
    a GPU machine (no pip install there) needs the same mapping, done here without setuptools.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("spotwise") is None:
        raise ImportError(f"spotwise is neither installed nor at {ROOT}")
    import spotwise

    if "spotwise.worker" in sys.modules:
        return
    try:
        if importlib.util.find_spec("spotwise.worker") is not None:
            return
    except ModuleNotFoundError:
        pass
    spec = importlib.util.spec_from_file_location(
        "spotwise.worker", ROOT / "worker" / "__init__.py", submodule_search_locations=[str(ROOT / "worker")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["spotwise.worker"] = module
    spec.loader.exec_module(module)
    spotwise.worker = module


def example_model_module():
    """examples/train_lm.py as a module: its LanguageModel and load_corpus are what we measure."""
    import_spotwise_runtime()
    name = "spotwise_example_train_lm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "train_lm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass(frozen=True)
class ModelSize:
    """The example model's shape (examples/train_lm.py's arguments of the same names)."""

    dim: int
    """Width of the residual stream."""
    layers: int
    """Transformer blocks."""
    heads: int
    """Attention heads (dim must divide by it)."""
    seq_len: int
    """Tokens per sequence."""


# Small enough that a saved checkpoint plus its expected state stays far under 16 MiB.
SMALL = ModelSize(dim=128, layers=2, heads=4, seq_len=64)
GLOBAL_BATCH = 6
"""Sequences per step: divisible at 1, 2 and 3 ranks with micro-batches of 1."""
TRAIN_STEPS = 3


def build_model(size: ModelSize, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The example's LanguageModel at `size`, its parameters in `dtype`, built on `device`."""
    lm = example_model_module()
    with torch.device(device):
        model = lm.LanguageModel(dim=size.dim, layers=size.layers, heads=size.heads, seq_len=size.seq_len)
    return model.to(dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, *, world_size: int, args: tuple, timeout_s: float = 300.0) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes; raise if any fails."""
    port = free_port()
    ctx = mp.start_processes(_rank_entry, args=(fn, world_size, port, args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks ran past {timeout_s:.0f}s")


def _rank_entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, world_size, *args)


def _runtime(rank: int, world_size: int, folder: Path, backend: str, generation: int):
    import_spotwise_runtime()
    from spotwise.worker.runtime import Runtime, RuntimeConfig
    from spotwise.worker.runtime.checkpoint import CheckpointConfig

    config = RuntimeConfig(
        rank=rank,
        world_size=world_size,
        generation=generation,
        backend=None if backend == "nccl" else backend,
        checkpoint=CheckpointConfig(uri=str(folder / "checkpoint"), async_mode="sync"),
    )
    return Runtime(config, global_batch_size=GLOBAL_BATCH, micro_batch_size=1, seed=0)


def full_state(model, optimizer) -> dict[str, Any]:
    """Model and optimizer state, unsharded, on CPU (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {"model": model_sd, "optim": optim_sd}


def save_rank(rank: int, world_size: int, folder: str, size: ModelSize, backend: str) -> None:
    """Train TRAIN_STEPS steps on this device, write expected.pt, commit the final step."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rt = _runtime(rank, world_size, folder, backend, generation=0)
    model = _shard_blocks(rt, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rt.restore(model, optimizer)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH * 4, size.seq_len + 1), generator=torch.Generator().manual_seed(1))

    def loss_of(ids) -> torch.Tensor:
        window = tokens[torch.as_tensor(ids)].to(rt.device)
        logits = model(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))

    sampler = rt.sampler(len(tokens))
    while rt.step < TRAIN_STEPS:
        rt.train_step(sampler, loss_of)
    state = full_state(model, optimizer)
    if rank == 0:
        torch.save(state, folder / "expected.pt")
        meta = {"size": asdict(size), "saved_on": rt.device.type, "world_size": world_size,
                "device_name": torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu",
                "torch": torch.__version__, "step": rt.step}
        (folder / "saved_on.json").write_text(json.dumps(meta, indent=1) + "\n")
    rt.finish()


def _shard_blocks(rt, size: ModelSize):
    model = build_model(size, dtype=torch.bfloat16)
    return rt.shard(model, blocks=model.blocks)


def restore_rank(rank: int, world_size: int, folder: str, size: ModelSize, backend: str) -> None:
    """Restore folder/checkpoint here; rank 0 writes folder/restored-<world>-<device>.json
    with the tensors that differ from expected.pt (none when bit-exact)."""
    folder = Path(folder)
    rt = _runtime(rank, world_size, folder, backend, generation=1)
    model = _shard_blocks(rt, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = rt.restore(model, optimizer)
    state = full_state(model, optimizer)
    if rank == 0:
        expected = torch.load(folder / "expected.pt", weights_only=True)
        report = {"step": step, "world_size": world_size, "device": rt.device.type,
                  "mismatches": compare(expected, state), "tensors": count_tensors(expected)}
        (folder / f"restored-{world_size}-{rt.device.type}.json").write_text(json.dumps(report, indent=1) + "\n")
    rt.checkpointer.close()
    torch.distributed.destroy_process_group()


def compare(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two nested states differ: a missing key, another dtype or shape, any other bit."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a dict, got {type(actual).__name__}"]
        out = [f"{path}/{k}: missing" for k in expected if k not in actual]
        out += [f"{path}/{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += compare(expected[k], actual[k], f"{path}/{k}")
        return out
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return [f"{path}: expected a tensor, got {type(actual).__name__}"]
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [f"{path}: {expected.dtype}{list(expected.shape)} became {actual.dtype}{list(actual.shape)}"]
        # Bits, not values: NaN == NaN and -0.0 != 0.0 here.
        a = expected.contiguous().reshape(-1).view(torch.uint8)
        b = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return [] if torch.equal(a, b) else [f"{path}: {int((a != b).sum())} bytes differ"]
    return [] if expected == actual else [f"{path}: {expected!r} became {actual!r}"]


def count_tensors(state: Any) -> int:
    if isinstance(state, dict):
        return sum(count_tensors(v) for v in state.values())
    return int(isinstance(state, torch.Tensor))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
