"""Where state lives: CIM_STATE moves all of it, and the test run keeps its own (tests/cimtest/state.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cimtest.demo import ROOT

from pipeline.context import make_context, run_state_dir
from pipeline.paths import state_root
from pipeline.runlock import lock_path


def test_the_test_run_never_uses_the_checkouts_state() -> None:
    root = state_root(ROOT)
    assert root != ROOT / ".cim" and not root.is_relative_to(ROOT), root
    assert os.environ["CIM_STATE"] == str(root)


def test_cim_state_moves_state_results_and_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIM_STATE")
    assert state_root(tmp_path) == tmp_path / ".cim"
    monkeypatch.setenv("CIM_STATE", "elsewhere")  # relative to the checkout
    assert state_root(tmp_path) == (tmp_path / "elsewhere").resolve()
    monkeypatch.setenv("CIM_STATE", str(tmp_path / "state"))
    ctx = make_context(ROOT, ROOT / "configs" / "demo", tmp_path / "artifacts")
    assert ctx.state_dir == run_state_dir(ROOT, ctx.domain_dir, ctx.artifacts_dir)
    for path in (ctx.state_dir, ctx.results_dir, ctx.machine_state, lock_path(ROOT, ctx.artifacts_dir)):
        assert path.is_relative_to(tmp_path / "state"), path
