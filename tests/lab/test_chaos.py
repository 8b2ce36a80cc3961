"""The short seeded chaos soak (bench/chaos.py with one fault of each kind): the job, elastic
between 2 and 3 hosts, ends SUCCEEDED with no invariant violated."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import run
from spotwise.cloud.chaos import KINDS

pytestmark = pytest.mark.slow


def test_short_seeded_soak_violates_nothing(tmp_path: Path) -> None:
    # Shorter gaps than the benchmark's (2-6 s) keep it within the suite's budget.
    report = run(seed=11, faults=len(KINDS), steps=100, workers=3, work=tmp_path, gap_s=(1.0, 3.0))
    assert report["faults_applied"] == len(KINDS)
    # Every fault hit a running job: it had steps left when the schedule ended.
    assert report["state_after_faults"] in ("RUNNING", "RESCALING", "PENDING"), report
    assert report["step_after_faults"] < 100, report
    assert set(report["faults_by_kind"]) == set(KINDS)
    assert len(report["invariants_checked"]) == 7
    assert report["violations"] == [], report
