"""pytest plugin: the demo domain and the doit runner.

Integration tests work on a private copy of the demo domain and a private artifacts directory, so they run in parallel
(`pytest -n auto`) without sharing doit state, artifacts, ports or VM names.  Tests import the helpers (`executed`,
`needs_demo`, `DoitRunner`, `busybox_derivation`) from here; the fixtures reach them through `pytest_plugins` in
conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import nix, process
from pipeline.context import state_dir_for
from pipeline.runlock import lock_path

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = ROOT / "configs" / "demo"


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


needs_demo = pytest.mark.skipif(
    not (DEMO / "inputs.json").exists() or not have("nix", "qemu-system-x86_64"),
    reason="the demo inputs are not prepared: run scripts/setup.sh",
)


@pytest.fixture
def demo_domain(tmp_path: Path) -> Iterator[Path]:
    """A private copy of configs/demo (with its inputs.json); its doit state is removed afterwards."""
    dest = tmp_path / "demo"
    shutil.copytree(DEMO, dest, ignore=shutil.ignore_patterns("result*"))
    yield dest
    shutil.rmtree(state_dir_for(ROOT, dest), ignore_errors=True)


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Iterator[Path]:
    """A private artifacts directory; its run lock (.cim/locks/) is removed afterwards."""
    path = tmp_path / "artifacts"
    path.mkdir()
    yield path
    lock_path(ROOT, path).unlink(missing_ok=True)


DoitRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def doit(artifacts_dir: Path) -> DoitRunner:
    """Run `doit domain=<dir> artifacts=<private dir> ARGS…` from the repository root, as a user would."""

    def run(
        domain: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts_dir}", *args]
        # Kept passes are content-addressed and would be shared by every copy of the demo: each test keeps its own,
        # so a test that means to boot a VM does boot one.
        results = {"CIM_RESULTS": str(artifacts_dir.parent / "results")}
        # pipeline.process.run kills doit's whole process group (QEMU, nix) if it overruns.
        proc = process.run(argv, cwd=ROOT, timeout=timeout, env={**os.environ, **results, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def executed(output: str) -> list[str]:
    """Task names doit ran (lines '.  name'), as opposed to up-to-date ones ('-- name')."""
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


def busybox_derivation(flake: Path, name: str, script: str, system: str = "") -> str:
    """A new derivation (NAME-<random>) whose builder is the demo's busybox running `sh -c SCRIPT` in the sandbox,
    written as a flake in `flake`; its .drv path.  SCRIPT is a Nix string: `${bb}` is busybox, `$out` the output."""
    (flake / "lib").mkdir(parents=True)
    shutil.copy(DEMO / "lib" / "inputs.nix", flake / "lib" / "inputs.nix")
    shutil.copy(DEMO / "inputs.json", flake / "inputs.json")
    system = system or nix.local_facts().system
    (flake / "flake.nix").write_text(f"""{{
  outputs = {{ self }}:
    let bb = "${{(import ./lib/inputs.nix "{system}").busybox}}/bin/busybox";
    in {{
      it = derivation {{
        name = "{name}-{uuid.uuid4().hex[:8]}";
        system = "{system}";
        builder = bb;
        args = [ "sh" "-c" "{script}" ];
      }};
    }};
}}
""")
    drv: str = nix.eval_json(f"path:{flake}#it.drvPath")
    return drv
