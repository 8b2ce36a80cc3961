"""The GPU path: bf16 FSDP2, pinned reused staging, cross-device reshard, and bench/gpu.py.

What needs a GPU skips without one and says so; what does not (the script's refusal without
CUDA, its FLOPs arithmetic, importing the runtime without the server's packages, the reshard
round trip itself on CPU ranks) runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
FIXTURE = ROOT / "tests" / "fixtures" / "gpu_checkpoint"
sys.path.insert(0, str(BENCH))  # bench/ is a folder of scripts; they import each other so

import gpu_reshard as rs  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
pytestmark = pytest.mark.timeout(240)


# ----- everywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_script_without_cuda_exits_non_zero_with_one_line() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bench/gpu.py: no CUDA device"), lines[0]
    assert not (ROOT / "bench" / "results" / "gpu.json").exists() or proc.stdout == ""


def test_gpu_script_help_and_bad_sizes() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--fixture-dir" in proc.stdout and "--deadline-s" in proc.stdout
    with pytest.raises(SystemExit) as exc:
        gpu.parse_args(["--dim", "100", "--heads", "16"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_gpu_script_runs_through_on_cpu_as_a_smoke_check(tmp_path: Path) -> None:
    """Every measuring phase of bench/gpu.py, on CPU at a tiny size, so that a GPU session does
    not spend its minutes on a broken script (the reshard phase is tested below, by parts)."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--smoke-cpu", "--skip-reshard", "--out", str(out),
           "--fixture-dir", str(tmp_path / "fixture"), "--dim", "32", "--layers", "1", "--heads", "2",
           "--seq-len", "16", "--micro-batch", "2", "--warmup", "1", "--steps", "2", "--async-saves", "2",
           "--sync-saves", "1", "--async-mode", "thread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["smoke_cpu"] is True and res["passed"].startswith("not measured")
    assert res["tokens_per_second"] > 0 and res["sync_save_s"] > 0 and res["first_save_block_s"] > 0
    assert res["checkpoint_filesystem"].endswith(")")
    assert res["async_block_over_sync"] == pytest.approx(res["async_block_s"] / res["sync_save_s"])
    assert res["flops_per_token"] == gpu.flops_per_token(matmul_params=res["matmul_parameters"], layers=1,
                                                         dim=32, seq_len=16)
    refused = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke-cpu"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 2 and "give it --out and --fixture-dir" in refused.stderr


def test_flops_formula_and_mfu() -> None:
    # 6 N + 12 L d T, by hand for N = 1e9, L = 24, d = 2048, T = 2048.
    fpt = gpu.flops_per_token(matmul_params=10**9, layers=24, dim=2048, seq_len=2048)
    assert fpt == 6e9 + 12 * 24 * 2048 * 2048
    assert gpu.mfu(tokens_per_second=989e12 / fpt, flops_per_token=fpt) == pytest.approx(1.0)
    assert gpu.mfu(tokens_per_second=1000.0, flops_per_token=1e9, peak_flops=4e12) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="layers must be positive"):
        gpu.flops_per_token(matmul_params=1, layers=0, dim=1, seq_len=1)
    assert "6 * N" in gpu.FLOPS_FORMULA


def test_targets_are_checked_each_way() -> None:
    good = {"async_block_over_sync": 0.01, "staging_over_pinned_bandwidth": 0.8, "mfu": 0.4}
    assert gpu.check_targets(good) == dict.fromkeys(good, True)
    bad = {"async_block_over_sync": 0.2, "staging_over_pinned_bandwidth": 0.3}
    assert gpu.check_targets(bad) == {"async_block_over_sync": False, "staging_over_pinned_bandwidth": False, "mfu": False}


def test_default_size_is_over_a_billion_parameters() -> None:
    args = gpu.parse_args([])
    size = rs.ModelSize(dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    with torch.device("meta"):
        model = rs.example_model_module().LanguageModel(dim=size.dim, layers=size.layers, heads=size.heads,
                                                        seq_len=size.seq_len)
    assert sum(p.numel() for p in model.parameters()) >= 10**9


# Imported as on the GPU image: spotwise not installed (the editable install's finder is taken
# out), and none of the daemon's, S3's or tracking's packages.
_WITHOUT_SERVER_PACKAGES = """
import importlib.abc, sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
BLOCKED = {"s3fs", "boto3", "botocore", "aiobotocore", "grpc", "pydantic", "pydantic_settings",
           "mlflow", "yaml", "rich", "tenacity", "prometheus_client", "matplotlib", "moto"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not on the GPU image")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import gpu_reshard as rs, torch
rs.import_spotwise_runtime()
from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer
ckpt = Checkpointer(CheckpointConfig(uri=sys.argv[2], async_mode="sync"), rank=0, world_size=1,
                    generation=0, device=torch.device("cpu"))
state = {"w": torch.arange(6, dtype=torch.bfloat16)}
assert ckpt.save(1, state, cursor=0, blocking=True)
out = {"w": torch.zeros(6, dtype=torch.bfloat16)}
ckpt.load(out, ckpt.choose(None))
assert torch.equal(out["w"], state["w"])
rs.build_model(rs.SMALL, dtype=torch.bfloat16)
import spotwise.worker.runtime.checkpoint as c
print("ok", sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED), c.__file__)
"""


def test_runtime_and_local_checkpoints_import_without_server_packages(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_SERVER_PACKAGES, str(BENCH), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok [] {ROOT / 'worker' / 'runtime' / 'checkpoint.py'}"


def test_compare_sees_bits_not_values() -> None:
    a = {"m": {"w": torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)}, "s": 3}
    assert rs.compare(a, {"m": {"w": a["m"]["w"].clone()}, "s": 3}) == []
    assert rs.compare(a, {"m": {"w": torch.tensor([-0.0, float("nan")], dtype=torch.bfloat16)}, "s": 3}) == [
        "/m/w: 1 bytes differ"
    ]
    assert rs.compare(a, {"m": {"w": a["m"]["w"].float()}, "s": 3})[0].startswith("/m/w: torch.bfloat16[2] became torch.float32")
    assert rs.compare(a, {"m": {}, "s": 4}) == ["/m/w: missing", "/s: 3 became 4"]


@pytest.mark.slow
def test_cpu_checkpoint_restores_bit_exactly_on_other_rank_counts(tmp_path: Path) -> None:
    """The reshard check bench/gpu.py runs, on CPU alone: saved at 2 ranks, restored at 3."""
    rs.spawn_ranks(rs.save_rank, world_size=2, args=(str(tmp_path), rs.SMALL, "gloo"), timeout_s=180)
    saved = json.loads((tmp_path / "saved_on.json").read_text())
    assert saved["saved_on"] == "cpu" and saved["step"] == rs.TRAIN_STEPS
    rs.spawn_ranks(rs.restore_rank, world_size=3, args=(str(tmp_path), rs.SMALL, "gloo"), timeout_s=180)
    report = json.loads((tmp_path / "restored-3-cpu.json").read_text())
    assert report["mismatches"] == []
    assert report["step"] == rs.TRAIN_STEPS and report["tensors"] > 10


@pytest.mark.skipif(not FIXTURE.exists(), reason=f"no GPU-saved fixture at {FIXTURE.relative_to(ROOT)} yet: "
                    "bench/gpu.py on a GPU writes one (README, 'GPU')")
@pytest.mark.parametrize("world", [2, 3])
def test_gpu_saved_fixture_restores_bit_exactly_on_cpu_ranks(tmp_path: Path, world: int) -> None:
    saved = json.loads((FIXTURE / "saved_on.json").read_text())
    assert saved["saved_on"] == "cuda", saved
    folder = tmp_path / "fixture"
    shutil.copytree(FIXTURE, folder)  # a restore writes its fence marker; the fixture stays as committed
    size = rs.ModelSize(**saved["size"])
    rs.spawn_ranks(rs.restore_rank, world_size=world, args=(str(folder), size, "gloo"), timeout_s=180)
    report = json.loads((folder / f"restored-{world}-cpu.json").read_text())
    assert report["mismatches"] == [] and report["tensors"] > 10


# ----- on a GPU


@needs_cuda
def test_bf16_fsdp2_mixed_precision_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 sharded parameters, bf16 compute: the runtime's policy on GPU, one NCCL rank."""
    monkeypatch.setenv("MASTER_PORT", str(rs.free_port()))  # the Runtime would leave its own set
    rs.import_spotwise_runtime()
    from spotwise.worker.runtime import Runtime, RuntimeConfig

    rt = Runtime(RuntimeConfig(generation=0), global_batch_size=2, micro_batch_size=2)
    try:
        assert rt.device.type == "cuda"
        model = rs.build_model(rs.SMALL, dtype=torch.float32)
        model = rt.shard(model, blocks=model.blocks)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rt.restore(model, optimizer)
        before = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters()}
        tokens = torch.randint(0, 256, (8, rs.SMALL.seq_len + 1), device=rt.device)
        seen = {}

        def loss_of(ids):
            window = tokens[torch.as_tensor(ids, device=rt.device)]
            logits = model(window[:, :-1])
            seen["dtype"] = logits.dtype
            return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), window[:, 1:].reshape(-1))

        loss = rt.train_step(rt.sampler(len(tokens)), loss_of)
        assert seen["dtype"] == torch.bfloat16 and loss == loss  # bf16 compute, a finite loss
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32, name
            assert p.grad is None  # zeroed after the step
        changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach().full_tensor())]
        assert len(changed) == len(before)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_staging_buffers_are_reused_across_saves(tmp_path: Path, device: str) -> None:
    """One host buffer per source tensor, allocated at the first save and refilled at each
    later one; pinned on GPU (what makes steady-state staging run at host-memory bandwidth)."""
    rs.import_spotwise_runtime()
    from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer

    ckpt = Checkpointer(CheckpointConfig(uri=str(tmp_path / "c"), async_mode="thread", keep=1), rank=0,
                        world_size=1, generation=0, device=torch.device(device))
    state = {"w": torch.randn(1 << 20, device=device), "b": torch.randn(3, 1024, device=device)}
    assert ckpt.save(1, state, cursor=0, blocking=False)
    assert ckpt.wait() is not None
    # DCP keeps no public handle on its staging buffers: its cache is read to check them.
    cache = ckpt._stager._state_dict_stager._cached_storage_mapping
    first = {id(k): v.data_ptr() for k, v in cache.items()}
    assert len(first) == 2
    assert all(v.is_pinned() for v in cache.values()) == (device == "cuda")
    state["w"].add_(1.0)
    assert ckpt.save(2, state, cursor=0, blocking=False)
    m = ckpt.wait()
    cache = ckpt._stager._state_dict_stager._cached_storage_mapping  # the stager now in use
    assert {id(k): v.data_ptr() for k, v in cache.items()} == first
    out = {"w": torch.empty_like(state["w"]), "b": torch.empty_like(state["b"])}
    ckpt.load(out, m)
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
    ckpt.close()


@needs_cuda
def test_gpu_checkpoint_restores_on_cpu_ranks_and_back(tmp_path: Path) -> None:
    gpu_saved = tmp_path / "gpu"
    rs.spawn_ranks(rs.save_rank, world_size=1, args=(str(gpu_saved), rs.SMALL, "nccl"), timeout_s=180)
    assert json.loads((gpu_saved / "saved_on.json").read_text())["saved_on"] == "cuda"
    assert rs.folder_bytes(gpu_saved) <= 16 * 2**20
    rs.spawn_ranks(rs.restore_rank, world_size=2, args=(str(gpu_saved), rs.SMALL, "gloo"), timeout_s=180)
    assert json.loads((gpu_saved / "restored-2-cpu.json").read_text())["mismatches"] == []
    cpu_saved = tmp_path / "cpu"
    rs.spawn_ranks(rs.save_rank, world_size=2, args=(str(cpu_saved), rs.SMALL, "gloo"), timeout_s=180)
    rs.spawn_ranks(rs.restore_rank, world_size=1, args=(str(cpu_saved), rs.SMALL, "nccl"), timeout_s=180)
    assert json.loads((cpu_saved / "restored-1-cuda.json").read_text())["mismatches"] == []
