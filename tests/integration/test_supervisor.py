"""The supervisor against real subprocesses: environment, stop protocol, process groups, logs."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from spotwise.worker.agent.supervisor import LaunchSpec, Supervisor
from tests.support.wait import until as _wait_for

CONTRACT_VARS = {
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "OMP_NUM_THREADS", "SPOTWISE_JOB_ID", "SPOTWISE_GENERATION", "SPOTWISE_CHECKPOINT_URI",
    "SPOTWISE_CHECKPOINT_EVERY", "SPOTWISE_CHECKPOINT_KEEP", "SPOTWISE_GLOBAL_BATCH_SIZE",
    "SPOTWISE_RESTORE_STEP", "SPOTWISE_EVENTS_FILE", "SPOTWISE_JOB_FACTS_FILE",
    "SPOTWISE_REQUEST_HOLD_S",
}


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _spec(entrypoint: list[str], **kw) -> LaunchSpec:
    base = dict(job_id="job-1", generation=3, entrypoint=tuple(entrypoint), world_size=2,
                node_rank=0, num_nodes=1, rank_start=0, nproc=2, master_addr="127.0.0.1",
                master_port=1)
    base.update(kw)
    return LaunchSpec(**base)


def _pid_alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a zombie runs nothing; its reaper is init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_all_exited(sup: Supervisor, timeout_s: float) -> None:
    def done() -> bool:
        sup.poll()
        return not sup.running
    _wait_for(done, timeout_s, "processes to exit")


def test_env_is_exactly_the_contract(tmp_path: Path) -> None:
    dump = _script(tmp_path, "dump.py", """
        import json, os, sys
        with open(sys.argv[1] + "/env." + os.environ["RANK"] + ".json", "w") as f:
            json.dump(dict(os.environ), f)
    """)
    base_env = {"PATH": os.environ.get("PATH", ""), "KEEP_ME": "1"}
    spec = _spec(["python", dump, str(tmp_path)], rank_start=2, world_size=4, node_rank=1,
                 num_nodes=2, master_addr="10.0.0.9", master_port=29400, restore_step=-1,
                 spec_env={"USER_VAR": "x", "RANK": "99"}, checkpoint_uri="file:///ck",
                 checkpoint_every=5, checkpoint_keep=2, global_batch_size=32)
    sup = Supervisor(spec, log_dir=tmp_path / "logs", base_env=base_env)
    sup.start()
    _wait_all_exited(sup, 30)
    assert [p.exit_code for p in sup.processes] == [0, 0]
    for local_rank, rank in enumerate((2, 3)):
        env = json.loads((tmp_path / f"env.{rank}.json").read_text())
        added = set(env) - set(base_env) - {"USER_VAR"}
        # Python itself may add LC_CTYPE under a C locale; nothing else may appear.
        assert added - {"LC_CTYPE"} == CONTRACT_VARS
        assert env["KEEP_ME"] == "1" and env["USER_VAR"] == "x"
        assert env["RANK"] == env["ROLE_RANK"] == str(rank)  # the spec cannot clobber it
        assert float(env["SPOTWISE_REQUEST_HOLD_S"]) > 0  # under an agent, requests hold
        assert env["LOCAL_RANK"] == str(local_rank)
        assert (env["WORLD_SIZE"], env["ROLE_WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("4", "4", "2")
        assert (env["GROUP_RANK"], env["GROUP_WORLD_SIZE"]) == ("1", "2")
        assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "29400")
        assert env["TORCHELASTIC_RESTART_COUNT"] == env["SPOTWISE_GENERATION"] == "3"
        assert env["TORCHELASTIC_RUN_ID"] == env["SPOTWISE_JOB_ID"] == "job-1"
        assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert env["OMP_NUM_THREADS"] == "1"
        assert env["SPOTWISE_RESTORE_STEP"] == "-1"
        assert (env["SPOTWISE_CHECKPOINT_URI"], env["SPOTWISE_CHECKPOINT_EVERY"],
                env["SPOTWISE_CHECKPOINT_KEEP"], env["SPOTWISE_GLOBAL_BATCH_SIZE"]) == (
                    "file:///ck", "5", "2", "32")
        assert env["SPOTWISE_EVENTS_FILE"] == str(
            tmp_path / "logs" / "job-1" / "g3" / f"rank{rank}.events.jsonl")


def test_unmodified_torchrun_script_runs_on_the_agent_store(tmp_path: Path) -> None:
    """A plain env:// script (what torchrun runs) rendezvouses on a store the test hosts, as
    node rank 0's agent would, and does a real collective."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     multi_tenant=True, timeout=timedelta(seconds=30))
    script = _script(tmp_path, "allreduce.py", """
        import os, sys, torch, torch.distributed as dist
        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=30))
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        with open(sys.argv[1] + "/sum." + os.environ["RANK"], "w") as f:
            f.write(str(t.item()))
        dist.destroy_process_group()
    """)
    spec = _spec(["python", script, str(tmp_path)], master_port=store.port)
    sup = Supervisor(spec, log_dir=tmp_path / "logs")
    sup.start()
    try:
        _wait_all_exited(sup, 90)
    finally:
        sup.kill()
    logs = [p.log_path.read_text() for p in sup.processes]
    assert [p.exit_code for p in sup.processes] == [0, 0], logs
    assert [(tmp_path / f"sum.{r}").read_text() for r in (0, 1)] == ["3.0", "3.0"]


def test_sigterm_then_grace_then_sigkill(tmp_path: Path) -> None:
    stubborn = _script(tmp_path, "stubborn.py", """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(sys.argv[1] + "/ready." + os.environ["RANK"], "w").close()
        while True:
            time.sleep(0.1)
    """)
    sup = Supervisor(_spec(["python", stubborn, str(tmp_path)], nproc=1, world_size=1),
                     log_dir=tmp_path / "logs")
    sup.start()
    _wait_for(lambda: (tmp_path / "ready.0").exists(), 30, "the process to ignore SIGTERM")
    t0 = time.monotonic()
    sup.stop_blocking(grace_s=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 6.0
    assert sup.processes[0].exit_code == 137  # SIGKILL, after the grace
    assert not sup.running


def test_sigterm_handler_exit_is_reported_as_143_without_waiting_the_grace(tmp_path: Path) -> None:
    polite = _script(tmp_path, "polite.py", """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        open(sys.argv[1] + "/ready", "w").close()
        while True:
            time.sleep(0.05)
    """)
    sup = Supervisor(_spec(["python", polite, str(tmp_path)], nproc=1, world_size=1),
                     log_dir=tmp_path / "logs")
    sup.start()
    _wait_for(lambda: (tmp_path / "ready").exists(), 30, "the process to start")
    t0 = time.monotonic()
    sup.stop_blocking(grace_s=20.0)
    assert time.monotonic() - t0 < 10.0
    assert sup.processes[0].exit_code == 143
    exits = sup.take_exits()
    assert [(p.rank, p.exit_code) for p in exits] == [(0, 143)]
    assert sup.take_exits() == []  # each exit is handed out once


def test_group_kill_leaves_no_orphan_grandchild(tmp_path: Path) -> None:
    parent = _script(tmp_path, "parent.py", """
        import os, signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import signal, time\\n"
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
                                  "time.sleep(600)"])
        with open(sys.argv[1] + "/grandchild." + os.environ["RANK"], "w") as f:
            f.write(str(child.pid))
        # Exit on SIGTERM at once, abandoning the grandchild (as a crashing trainer would).
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        while True:
            time.sleep(0.05)
    """)
    sup = Supervisor(_spec(["python", parent, str(tmp_path)]), log_dir=tmp_path / "logs")
    sup.start()
    files = [tmp_path / f"grandchild.{r}" for r in (0, 1)]
    _wait_for(lambda: all(f.exists() and f.read_text() for f in files), 30, "grandchildren")
    grandchildren = [int(f.read_text()) for f in files]
    assert all(_pid_alive(pid) for pid in grandchildren)
    sup.stop_blocking(grace_s=5.0)
    assert [p.exit_code for p in sup.processes] == [143, 143]
    _wait_for(lambda: not any(_pid_alive(pid) for pid in grandchildren), 10,
              "the grandchildren to die with their process group")


def test_logs_capture_stdout_and_stderr_per_rank(tmp_path: Path) -> None:
    chatty = _script(tmp_path, "chatty.py", """
        import os, sys
        print("out from", os.environ["RANK"], flush=True)
        print("err from", os.environ["RANK"], file=sys.stderr, flush=True)
        sys.exit(3)
    """)
    sup = Supervisor(_spec(["python", chatty]), log_dir=tmp_path / "logs")
    sup.start()
    _wait_all_exited(sup, 30)
    assert [p.exit_code for p in sup.processes] == [3, 3]
    for rank in (0, 1):
        text = (tmp_path / "logs" / "job-1" / "g3" / f"rank{rank}.log").read_text()
        assert f"out from {rank}" in text and f"err from {rank}" in text


def test_bad_working_dir_is_refused(tmp_path: Path) -> None:
    from spotwise.worker.agent.supervisor import SupervisorError

    sup = Supervisor(_spec([sys.executable, "-c", "pass"], working_dir=str(tmp_path / "nope")),
                     log_dir=tmp_path / "logs")
    with pytest.raises(SupervisorError, match="working_dir"):
        sup.start()


def test_launch_spec_rejects_ranks_beyond_the_world() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        _spec(["python", "x.py"], rank_start=1, nproc=2, world_size=2)
