"""The fault lab's tests need root (network namespaces, iptables, tc). As root, a missing tool
is a failure, not a skip: CI runs as root, and a lab that silently does not run proves nothing.
As another user they skip, saying why."""

from __future__ import annotations

import os

import pytest

from spotwise.cloud.netlab import missing_tools


@pytest.fixture(autouse=True)
def _lab_prerequisites() -> None:
    if os.geteuid() != 0:
        pytest.skip("the fault lab needs root (network namespaces, iptables, tc)")
    missing = missing_tools()
    if missing:
        pytest.fail(f"running as root but {', '.join(missing)} missing: run `make setup-lab`")
