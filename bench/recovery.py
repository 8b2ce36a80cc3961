"""Recovery after losing a node, phase by phase: spotwise vs torchrun elastic (its defaults, and
tuned), the same workload on the same machine.

All run tests/workloads/tiny_train.py on two "nodes" of one process each
(bench/recovery_systems.py):

- torchrun: two `torchrun --nnodes=1:2 --nproc-per-node=1 --rdzv-backend=c10d` agents whose
  rendezvous store is a standalone TCPStore process (`--rdzv-conf=is_host=false`), so losing a
  node does not take the store with it. `torchrun` keeps every other setting at torchrun's
  default (a 30 s last call); `torchrun_tuned` sets what an experienced user would
  (bench/torchrun_elastic.py's TUNED, the same as the goodput bench's: `last_call_timeout=2,
  join_timeout=600,keep_alive_interval=1,keep_alive_max_attempt=3`, `--monitor-interval=0.1`). Both log at LOGLEVEL=INFO, so that
  their restarts and rendezvous are on record.
  Restarts resume from the newest committed checkpoint (the spotwise runtime runs under
  torchrun too: torchrun with DCP).
- spotwise: a `spotwise daemon` and two local agents (the local provider), default settings.

For each kill, a system starts fresh, trains at world size 2 until a checkpoint is committed,
and the node running global rank 1 is SIGKILLed (its agent and its workers). The time from the
kill to each phase (bench/recovery_phases.py: detected, old processes stopped, new rendezvous,
the new rank 0's first line after its imports, its process group, restore finished, first step)
comes from what the systems record: the daemon's job events, torchrun's log lines (stamped as
they are read), the runtime's events, the workload's timeline, /proc. Systems are interleaved
across rounds (A B C, B C A, C A B, ...); every kill is kept in the JSON and each phase is
reported as its median over the kills with its spread.

Writes bench/results/recovery.json and prints one line per system and phase.

    python bench/recovery.py                  # 3 rounds of the three systems, ~8-12 minutes
    python bench/recovery.py --rounds 1 --systems spotwise,torchrun_tuned
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from recovery_phases import PHASES, out_of_order, phases
from recovery_systems import REPO, SYSTEMS
from repeats import interleaved, summary
from torchrun_elastic import TUNED

TARGETS = {"spotwise_recovery_s": ("<=", 5.0), "ratio": ("<=", 0.12)}


def summarize(kills: dict[str, list[dict]]) -> dict[str, dict]:
    """Per system: each phase's summary over its kills, and lost steps'."""
    out = {}
    for system, runs in kills.items():
        ok = [k for k in runs if "error" not in k]
        names = list(dict.fromkeys(n for k in ok for n in k["phases"]))
        out[system] = {
            "phases": {n: summary(k["phases"].get(n) for k in ok) for n in names},
            "lost_steps": summary((k["lost_steps"] for k in ok), digits=1),
            "kills": len(ok), "failed_kills": len(runs) - len(ok),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="kills per system (interleaved)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=100_000, help="workload steps (never reached)")
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--warm-steps", type=int, default=15, help="steps at world 2 before the kill")
    p.add_argument("--timeout-s", type=float, default=240.0, help="bound of each wait")
    p.add_argument("--skip-torchrun", action="store_true", help="spotwise only")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recovery.json")
    args = p.parse_args()
    systems = ["spotwise"] if args.skip_torchrun else [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems or args.rounds < 1:
        p.error(f"--systems takes {', '.join(SYSTEMS)} (got {unknown or systems}); --rounds >= 1")

    started = time.time()
    kills: dict[str, list[dict]] = {s: [] for s in systems}
    order = interleaved(systems, args.rounds)
    with tempfile.TemporaryDirectory(prefix="spotwise-bench-recovery-") as tmp:
        for r, round_order in enumerate(order):
            for system in round_order:
                work = Path(tmp) / f"{system}-{r}"
                try:
                    res = SYSTEMS[system](work, args)
                except (TimeoutError, RuntimeError) as exc:  # kept, and left out of medians
                    kills[system].append({"round": r, "error": str(exc)})
                    print(f"[round {r + 1}] {system}: failed: {exc}", flush=True)
                    continue
                ph = phases(res.kill, res.marks)
                kills[system].append({"round": r, "phases": ph, "lost_steps": res.lost_steps,
                                      "out_of_order": out_of_order(ph), **res.notes})
                print(f"[round {r + 1}] {system}: " + ", ".join(f"{n} {ph[n]}" for n in PHASES),
                      flush=True)
    per = summarize(kills)

    def median(system: str, phase: str = "first_step"):
        return per.get(system, {}).get("phases", {}).get(phase, {}).get("median")

    sw, tr, tt = median("spotwise"), median("torchrun"), median("torchrun_tuned")
    result = {
        # The first step at the new world size, as before: medians over the kills.
        "spotwise_recovery_s": sw,
        "torchrun_recovery_s": tr,
        "torchrun_tuned_recovery_s": tt,
        "ratio": round(sw / tr, 4) if sw and tr else None,
        "ratio_tuned": round(sw / tt, 4) if sw and tt else None,
        "detection_s": median("spotwise", "detected"),
        "lost_steps": per.get("spotwise", {}).get("lost_steps", {}).get("median"),
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "systems": per,
        "kills": kills,
        "order": order,
        "setup": {
            "nodes": 2, "nproc_per_node": 1, "step_sleep_s": args.step_sleep,
            "checkpoint_every": args.every, "warm_steps": args.warm_steps,
            "killed": "the node running rank 1 (SIGKILL of its agent and workers)",
            "torchrun": "--nnodes=1:2 c10d rendezvous on a standalone TCPStore, defaults",
            "torchrun_tuned": "as torchrun, plus " + " ".join(TUNED.flags()),
            "torchrun_logging": "LOGLEVEL=INFO (its agent logs restarts and rendezvous at INFO)",
            "spotwise": "daemon and 2 local agents, default settings",
            "phases": "seconds from the kill; see bench/recovery_phases.py for each signal",
            "rounds": args.rounds, "wall_s": round(time.time() - started, 1),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for system, s in per.items():
        for name, f in s["phases"].items():
            print(f"{system} {name}: {f['median']} ({f['min']}-{f['max']}, n={f['n']})")
    for key in ("spotwise_recovery_s", "torchrun_recovery_s", "torchrun_tuned_recovery_s",
                "ratio", "ratio_tuned", "detection_s", "lost_steps"):
        print(f"{key}: {result[key]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
