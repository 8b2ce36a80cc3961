"""GPU check: the example language model on one GPU with NCCL, and what checkpoints cost there.

On one CUDA device (world size 1: NCCL runs one rank per GPU), through the spotwise Runtime:

- tokens_per_second and mfu of examples/train_lm.py's model at >= 1 B parameters held in bf16
  (FSDP2 with the runtime's MixedPrecisionPolicy), MFU against the dense bf16 peak 989 TFLOP/s
  with FLOPs per token = 6 N + 12 L d T (N the matmul parameters, L layers, d width, T
  sequence length; PaLM's convention, causal attention counted in full);
- async_block_over_sync: training blocked by an async save (device-to-host staging into pinned
  host memory, kept across saves) over a synchronous save that ends with fsync, steady state;
  first_save_block_s: the first async save of a generation (it allocates and pins the buffers);
- upload_gb_per_s: the background upload to local disk, fsync included;
- staging_over_pinned_bandwidth: steady-state staging throughput over a plain pinned
  device-to-host copy measured here;
- peak_memory_gib: peak GPU memory while training, and while a checkpoint is in flight;
- reshard: a small model saved on this GPU restores bit-exactly (in bf16, its saved dtype) on 2
  and 3 gloo CPU ranks, and one saved on 2 CPU ranks restores on this GPU. The GPU-saved one is
  kept in --fixture-dir for tests/fixtures/gpu_checkpoint (README, "GPU").

Sizing for the 8-minute limit on an H200: the default model (d 2048, 24 layers, 1.2 B
parameters, 7.2 GB of bf16 parameters plus AdamW state) takes about 0.4 s a step at the MFU
target with micro-batches of 8 x 2048 tokens; 10 warm-up and 20 timed steps, three async and two
sync saves (each a few seconds at 1 GB/s of disk) and the reshard runs (seconds) add up to
about 2 to 4 minutes. Past --deadline-s no further steady-state async save starts.

Run: python bench/gpu.py [--dim 2048 --layers 24 --steps 20 --out bench/results/gpu.json]
Needs torch with CUDA and NCCL, and this tree (spotwise need not be installed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_reshard as rs  # noqa: E402  (after the path: it sits beside this script)

PEAK_BF16_FLOPS = 989e12
"""H200 (and H100 SXM) dense bf16 tensor-core peak, FLOP/s."""
TARGETS = {"async_block_over_sync": ("<=", 0.05), "staging_over_pinned_bandwidth": (">=", 0.5), "mfu": (">=", 0.35)}
FLOPS_FORMULA = "flops_per_token = 6 * N + 12 * L * d * T (N: parameters outside the token and position embeddings)"
GIB = 2**30


def flops_per_token(*, matmul_params: int, layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (2 forward, 4 backward) plus attention's
    score and value products, 12 L d T (forward 4 L d T, backward twice that)."""
    for name, v in (("matmul_params", matmul_params), ("layers", layers), ("dim", dim), ("seq_len", seq_len)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    return 6.0 * matmul_params + 12.0 * layers * dim * seq_len


def mfu(*, tokens_per_second: float, flops_per_token: float, peak_flops: float = PEAK_BF16_FLOPS) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    return tokens_per_second * flops_per_token / peak_flops


def check_targets(results: dict) -> dict[str, bool]:
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = results.get(name)
        out[name] = value is not None and (value <= bound if op == "<=" else value >= bound)
    return out


def require_cuda() -> None:
    """Exit with one line (code 2) unless a CUDA device and NCCL are there."""
    import torch.distributed as dist

    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU build)"
        sys.exit(f"bench/gpu.py: no CUDA device: torch {torch.__version__} (CUDA build: {build}) sees no GPU; "
                 "run it on a machine with one")
    if not dist.is_nccl_available():
        sys.exit(f"bench/gpu.py: torch {torch.__version__} has no NCCL; it needs a CUDA build with NCCL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=2048, help="model width")
    p.add_argument("--layers", type=int, default=24, help="transformer blocks")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per step (one micro-batch)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--async-saves", type=int, default=3, help="async saves: the first, then steady ones")
    p.add_argument("--sync-saves", type=int, default=2, help="synchronous saves (fsync'd)")
    p.add_argument("--async-mode", choices=("process", "thread"), default="process",
                   help="the runtime's upload mode (process: DCP's writer process, the default)")
    p.add_argument("--dir", default=None,
                   help="checkpoint folder on local disk (default: a temporary one; the JSON names its filesystem)")
    p.add_argument("--fixture-dir", default="bench/results/gpu_checkpoint",
                   help="where the small GPU-saved checkpoint is kept (for tests/fixtures/gpu_checkpoint)")
    p.add_argument("--out", default="bench/results/gpu.json", help="results JSON")
    p.add_argument("--deadline-s", type=float, default=420.0, help="seconds after which no further steady-state async save starts")
    p.add_argument("--skip-reshard", action="store_true", help="measure only (no cross-device restores)")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run every phase on CPU (gloo) to check the script itself: no GPU figures, not a measurement")
    args = p.parse_args(argv)
    if args.smoke_cpu and (args.out == p.get_default("out") or args.fixture_dir == p.get_default("fixture_dir")):
        p.error("--smoke-cpu measures nothing: give it --out and --fixture-dir away from bench/results")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} does not divide by --heads {args.heads}")
    if min(args.steps, args.async_saves, args.sync_saves, args.micro_batch) < 1 or args.async_saves < 2:
        p.error("--steps, --sync-saves and --micro-batch must be >= 1, --async-saves >= 2")
    return args


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def filesystem_of(path: Path) -> str:
    """The mount holding `path` and its type (a tmpfs would make fsync'd saves RAM-speed)."""
    best = ("?", "?")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (resolved + "/").startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best[0]):
            best = (parts[1], parts[2])
    return f"{best[0]} ({best[1]})"


def pinned_copy_gb_per_s(nbytes: int = 2 * GIB, reps: int = 5) -> float:
    """Device-to-host copy bandwidth into pinned memory (the best of `reps`), GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return nbytes / best / 1e9


def reshard_checks(fixture_dir: Path, work: Path) -> dict:
    """GPU save -> 2 and 3 CPU ranks; 2 CPU ranks' save -> GPU. Every tensor compared bitwise."""
    out: dict = {"model": asdict(rs.SMALL), "dtype": "bfloat16"}
    if fixture_dir.exists():
        shutil.rmtree(fixture_dir)
    fixture_dir.mkdir(parents=True)
    rs.spawn_ranks(rs.save_rank, world_size=1, args=(str(fixture_dir), rs.SMALL, "nccl"))
    out["fixture_bytes"] = rs.folder_bytes(fixture_dir)
    for world in (2, 3):
        folder = work / f"gpu-to-cpu{world}"
        shutil.copytree(fixture_dir, folder)  # restores write a fence marker; the fixture stays clean
        rs.spawn_ranks(rs.restore_rank, world_size=world, args=(str(folder), rs.SMALL, "gloo"))
        out[f"gpu_to_{world}_cpu_ranks"] = json.loads((folder / f"restored-{world}-cpu.json").read_text())
    folder = work / "cpu2-to-gpu"
    folder.mkdir()
    rs.spawn_ranks(rs.save_rank, world_size=2, args=(str(folder), rs.SMALL, "gloo"))
    rs.spawn_ranks(rs.restore_rank, world_size=1, args=(str(folder), rs.SMALL, "nccl"))
    here = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a --smoke-cpu run
    out["cpu_2_ranks_to_gpu"] = json.loads((folder / f"restored-1-{here}.json").read_text())
    out["bit_exact"] = all(
        not out[k]["mismatches"] and out[k]["tensors"] > 0
        for k in ("gpu_to_2_cpu_ranks", "gpu_to_3_cpu_ranks", "cpu_2_ranks_to_gpu")
    )
    return out


def measure(args: argparse.Namespace, ckpt_dir: Path, started: float) -> dict:
    """Training throughput, then async and sync saves of the big model (this process, NCCL)."""
    rs.import_spotwise_runtime()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from spotwise.worker.runtime import Runtime, RuntimeConfig
    from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer

    size = rs.ModelSize(dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    rt = Runtime(RuntimeConfig(generation=0), global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch)
    torch.manual_seed(0)
    model = rs.build_model(size, dtype=torch.bfloat16, device=rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    matmul_params = n_params - model.tok.weight.numel() - model.pos.weight.numel()
    model = rt.shard(model, blocks=model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rt.restore(model, optimizer)
    data = torch.randint(0, 256, (1024, args.seq_len + 1), device=rt.device)
    sampler = rt.sampler(len(data))

    def loss_of(ids) -> torch.Tensor:
        window = data[torch.as_tensor(ids, device=rt.device)]
        logits = model(window[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))

    def steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            rt.train_step(sampler, loss_of)  # reads the loss back: the step has run when it returns
            times.append(time.perf_counter() - t0)
        return times

    steps(args.warmup)
    _reset_peak()
    step_times = steps(args.steps)
    peak_training = _peak_gib()
    tokens_per_step = args.micro_batch * args.seq_len
    tokens_per_second = tokens_per_step * len(step_times) / sum(step_times)
    fpt = flops_per_token(matmul_params=matmul_params, layers=args.layers, dim=args.dim, seq_len=args.seq_len)
    res: dict = {
        "parameters": n_params,
        "matmul_parameters": matmul_params,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": fpt,
        "flops_formula": FLOPS_FORMULA,
        "peak_flops": PEAK_BF16_FLOPS,
        "mfu": mfu(tokens_per_second=tokens_per_second, flops_per_token=fpt),
        "step_s_median": statistics.median(step_times),
    }
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes += sum(t.numel() * t.element_size() for s in optimizer.state.values()
                       for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    res["checkpoint_gpu_bytes"] = state_bytes
    mode = args.async_mode
    shm_free = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").exists() else 0
    if mode == "process" and shm_free < 1.5 * state_bytes:
        # The writer process reads the staged copy from /dev/shm; too small a one would fail.
        mode = "thread"
    res["async_mode"] = mode
    res["dev_shm_free_bytes"] = shm_free
    ckpt = Checkpointer(CheckpointConfig(uri=str(ckpt_dir), keep=1, async_mode=mode),
                        rank=0, world_size=1, generation=0, device=rt.device)
    res["checkpoint_filesystem"] = filesystem_of(ckpt_dir)
    step_no = [0]

    def save(blocking: bool) -> float:
        step_no[0] += 1
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _sync()
        t0 = time.perf_counter()
        ok = ckpt.save(step_no[0], {"model": model_sd, "optim": optim_sd}, cursor=0, blocking=blocking)
        dt = time.perf_counter() - t0
        if not ok:
            raise RuntimeError(f"checkpoint save {step_no[0]} failed (see the log)")
        return dt

    # First async save of the generation, with training going on while it uploads.
    res["first_save_block_s"] = save(blocking=False)
    _reset_peak()
    t0, in_flight = time.perf_counter(), []
    while ckpt.pending_step is not None and time.perf_counter() - t0 < 300:
        in_flight += steps(1)
        ckpt.poll()
    ckpt.wait()
    res["peak_memory_gib"] = {"training": peak_training, "checkpoint_in_flight": _peak_gib()}
    res["step_s_median_upload_in_flight"] = statistics.median(in_flight) if in_flight else None
    blocks, uploads = [], []
    for _ in range(args.async_saves - 1):
        blocks.append(save(blocking=False))
        t1 = time.perf_counter()
        manifest = ckpt.wait()
        if manifest is None:
            raise RuntimeError("an async checkpoint was not committed (see the log)")
        uploads.append(manifest.bytes / (time.perf_counter() - t1) / 1e9)
        if time.perf_counter() - started > args.deadline_s:
            break
    sync = [save(blocking=True) for _ in range(args.sync_saves)]
    ckpt.close()
    res.update(
        checkpoint_disk_bytes=manifest.bytes,
        async_block_s=statistics.median(blocks),
        sync_save_s=statistics.median(sync),
        async_block_over_sync=statistics.median(blocks) / statistics.median(sync),
        upload_gb_per_s=statistics.median(uploads),
    )
    res["staging_gb_per_s"] = state_bytes / res["async_block_s"] / 1e9
    if torch.cuda.is_available():
        res["pinned_copy_gb_per_s"] = pinned_copy_gb_per_s()
        res["staging_over_pinned_bandwidth"] = res["staging_gb_per_s"] / res["pinned_copy_gb_per_s"]
    torch.distributed.destroy_process_group()
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke_cpu:
        require_cuda()
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "smoke_cpu": args.smoke_cpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "setup": {**vars(args), "world_size": 1, "backend": "cpu:gloo,cuda:nccl", "param_dtype": "bfloat16",
                  "data": "random tokens on the device", "optimizer": "AdamW (state in the parameters' bf16)"},
    }
    with tempfile.TemporaryDirectory(prefix="spotwise-gpu-") as tmp:
        if not args.skip_reshard:
            results["reshard"] = reshard_checks(Path(args.fixture_dir), Path(tmp))
            print(f"reshard bit_exact: {results['reshard']['bit_exact']}", flush=True)
        ckpt_dir = Path(args.dir) if args.dir else Path(tmp) / "big"
        results.update(measure(args, ckpt_dir, started))
    results["passed"] = "not measured: a --smoke-cpu run" if args.smoke_cpu else check_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    for name in ("tokens_per_second", "mfu", "first_save_block_s", "async_block_over_sync",
                 "staging_over_pinned_bandwidth", "upload_gb_per_s", "peak_memory_gib"):
        print(f"{name}: {results.get(name)}")
    print(f"targets passed: {results['passed']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
