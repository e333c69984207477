"""CI lints before it tests: scripts/lint.sh (ruff check, ruff format --check, mypy --strict) fails on a lint error,
and .ci/run runs it before the pure tests, which run before the VM tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import process

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tracked_copy(dest: Path) -> Path:
    """The checkout's tracked files (as a clean clone has them) under `dest`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.mark.skipif(not (BIN / "ruff").exists(), reason="the dev tools are not installed (pip install -e '.[dev]')")
def test_lint_fails_on_a_lint_error_and_names_the_file(tmp_path: Path) -> None:
    copy = tracked_copy(tmp_path / "copy")
    errors = copy / "pipeline" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport os\n")  # unused, and an import after code
    proc = process.run(
        [str(copy / "scripts" / "lint.sh")], cwd=copy, timeout=300, env={**os.environ, "CIM_LINT_BIN": str(BIN)}
    )
    assert proc.returncode != 0, proc.stdout
    assert "pipeline/errors.py" in proc.stdout + proc.stderr and "F401" in proc.stdout + proc.stderr


def test_ci_lints_then_runs_the_pure_tests_then_the_rest() -> None:
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    where = {
        name: next(i for i, line in enumerate(steps) if re.search(pattern, line))
        for name, pattern in {
            "setup": r"^scripts/setup\.sh",
            "lint": r"^scripts/lint\.sh",
            "pure": r'pytest -n auto -m "not vm and not nix"',
            "all": r"pytest -n auto$",
        }.items()
    }
    assert where["setup"] < where["lint"] < where["pure"] < where["all"], where
