"""Checkpoints written by older torch versions restore through spotwise's restricted readers.

The fixtures under tests/fixtures/dcp/torch-X.Y were written by DCP under that torch
(tests/fixtures/dcp/make_fixture.py, run once in a throwaway virtualenv): the allow-listed
`.metadata` unpickler and the `weights_only` item loader must accept what each supported
version's DCP writes, and give back exactly what was saved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from spotwise.worker.runtime.dcp_reader import LocalReader
from spotwise.worker.runtime.dcp_safety import load_metadata

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dcp"
VERSIONS = sorted(p.name for p in FIXTURES.glob("torch-*"))


def _saved() -> dict:
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_fixture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.state()


def test_the_supported_older_versions_have_fixtures() -> None:
    assert {"torch-2.11", "torch-2.12"} <= set(VERSIONS), VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_a_checkpoint_of_an_older_torch_restores_exactly_through_the_restricted_readers(
        version: str) -> None:
    folder = FIXTURES / version
    written_by = (folder / "TORCH_VERSION").read_text().strip()
    assert written_by.startswith(version.removeprefix("torch-")), written_by
    saved = _saved()
    metadata = load_metadata((folder / ".metadata").read_bytes(), where=str(folder / ".metadata"))
    # DCP stores nested containers as flattened keys (trainer.sched.lrs).
    assert set(metadata.state_dict_metadata) == set(flatten_state_dict(saved)[0])

    template = {k: torch.full_like(v, -1) if isinstance(v, torch.Tensor)
                else {"last_epoch": None, "lrs": [None, None]} if isinstance(v, dict) else None
                for k, v in saved.items()}
    dcp.load(template, storage_reader=LocalReader(str(folder)), no_dist=True)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert template[key].dtype == value.dtype and torch.equal(template[key], value), key
        else:
            assert template[key] == value, key
