"""The two programs on a node do not import the daemon, and the runtime not the agent: read
from the source's import statements, so a new import anywhere in the package is caught."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"spotwise.worker.agent": REPO / "worker" / "agent",
                "spotwise.worker.runtime": REPO / "worker" / "runtime",
                "spotwise.common": REPO / "spotwise" / "common"}
FORBIDDEN = {
    "spotwise.worker.agent": ("spotwise.daemon",),
    # The runtime never talks to the daemon: no daemon client, no gRPC (what it learns of the
    # job comes from the agent, through files: events out, job facts in).
    "spotwise.worker.runtime": ("spotwise.daemon", "spotwise.worker.agent", "spotwise.client",
                                "grpc"),
    "spotwise.common": ("spotwise.daemon", "spotwise.worker"),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_agent_and_the_runtime_import_no_daemon_and_the_runtime_no_agent() -> None:
    problems = []
    for package, folder in PACKAGE_DIRS.items():
        files = sorted(folder.glob("*.py"))
        assert files, folder
        for path in files:
            for name in imports_of(path):
                for banned in FORBIDDEN[package]:
                    if name == banned or name.startswith(banned + "."):
                        problems.append(f"{path.relative_to(REPO)} imports {name}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from spotwise.daemon.store import Store\nimport spotwise.daemon.auth\n")
    assert {"spotwise.daemon.store", "spotwise.daemon.auth"} <= imports_of(bad)


def test_no_module_is_longer_than_500_lines() -> None:
    long = []
    for folder in ("daemon", "worker", "cloud", "spotwise"):
        for path in sorted((REPO / folder).rglob("*.py")):
            lines = path.read_text().count("\n")
            if lines > 500:
                long.append(f"{path.relative_to(REPO)}: {lines}")
    assert not long, long
