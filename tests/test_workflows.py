"""The GitHub Actions workflows pass a security review: zizmor (offline) finds nothing at medium or above, every action
is pinned to a commit, and no checkout leaves its token behind."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import process

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<action>[^@\s]+)@(?P<ref>\S+)(?P<rest>.*)$")


def zizmor() -> str | None:
    """The zizmor of this venv (the `test` extra installs it), else one on PATH."""
    beside = Path(sys.executable).with_name("zizmor")
    return str(beside) if beside.exists() else shutil.which("zizmor")


def workflow_files() -> list[Path]:
    files = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])
    assert files, f"no workflows under {WORKFLOWS}"
    return files


def test_zizmor_finds_nothing_at_medium_or_above() -> None:
    exe = zizmor()
    if exe is None:
        pytest.skip("zizmor is not installed (pip install -e '.[test]')")
    proc = process.run(
        [exe, "--offline", "--min-severity", "medium", "--format", "json", str(WORKFLOWS)], timeout=120, cwd=ROOT
    )
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and not findings, "zizmor:\n" + "\n".join(map(describe, findings)) + proc.stderr


def describe(finding: dict[str, Any]) -> str:
    """`ci.yml:19: artipacked: credential persistence …` from one finding of zizmor's JSON."""
    where = finding["locations"][0]
    path = where["symbolic"]["key"].get("Local", {}).get("verbatim_path", "?")
    row = where["concrete"]["location"]["start_point"]["row"] + 1
    return f"{Path(path).name}:{row}: {finding['ident']}: {finding['desc']}"


def test_every_action_is_pinned_to_a_commit_with_its_version() -> None:
    seen = 0
    for path in workflow_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = USES.match(line)
            if not match or match["action"].startswith("./"):
                continue
            seen += 1
            where = f"{path.name}:{number}"
            assert re.fullmatch(r"[0-9a-f]{40}", match["ref"]), f"{where}: {match['action']} is not pinned to a commit"
            assert re.search(r"#\s*v\d", match["rest"]), f"{where}: say which version the commit is (# vX.Y.Z)"
    assert seen > 0


def test_checkouts_keep_no_credentials() -> None:
    for path in workflow_files():
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            match = USES.match(line)
            if not match or match["action"] != "actions/checkout":
                continue
            step = []
            for following in lines[number + 1 :]:
                if USES.match(following) or re.match(r"^\s*-\s", following) or not following.strip():
                    break
                step.append(following.strip())
            assert "persist-credentials: false" in step, f"{path.name}:{number + 1}: checkout persists its token"
