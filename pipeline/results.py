"""Content-addressed test results: a boot or install that passed, kept by what decided it.

A pass is stored under `.cim/results/<kind>/<image xxh3>-<spec digest>/` with its outcome (`result.json`) and its
logs.  The image digest names the bytes that were tested and the spec digest everything else that decides the test
(VM size, firmware, probes; the disk plan for an install), so a stored pass holds for any copy of those bytes: after
`rm -rf artifacts`, or in another checkout sharing `.cim/`, the result and its logs are re-published and no VM boots.
Only passes are kept: a failure is worth re-running.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_text, publish_log

RESULT = "result.json"


@dataclass(frozen=True)
class StoredPass:
    """One kept pass: its directory, the outcome recorded then, and the logs kept with it (name -> file)."""

    path: Path
    outcome: dict[str, Any]
    logs: dict[str, Path]

    def restore(self, dests: Mapping[str, Path]) -> dict[str, Any]:
        """Publish the kept logs to `dests` (name -> path, atomically); returns the outcome, marked as reused."""
        for name, dest in dests.items():
            publish_log(self.logs[name], dest)  # whole or not at all; a full or read-only dest is one clear error
        return {**self.outcome, "reused": str(self.path)}


class PassStore:
    """The passes under one directory (`.cim/results`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, kind: str, image_xxh3: str, spec: str) -> Path:
        return self.root / kind / f"{image_xxh3}-{spec}"

    def find(self, kind: str, image_xxh3: str, spec: str, logs: tuple[str, ...]) -> StoredPass | None:
        """The kept pass for these bytes and this spec, if there is one with every log named in `logs`."""
        path = self.path(kind, image_xxh3, spec)
        try:
            outcome = json.loads((path / RESULT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        files = {name: path / name for name in logs}
        if (
            not isinstance(outcome, dict)
            or outcome.get("result") != "pass"
            or not all(f.is_file() for f in files.values())
        ):
            return None
        return StoredPass(path, outcome, files)

    def keep(self, kind: str, image_xxh3: str, spec: str, outcome: Mapping[str, Any], logs: Mapping[str, Path]) -> Path:
        """Keep a pass and copies of its logs (name -> published file); written aside, then renamed into place."""
        if outcome.get("result") != "pass":
            raise ValueError("only passes are kept")
        final = self.path(kind, image_xxh3, spec)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, source in logs.items():
            shutil.copyfile(source, tmp / name)
        atomic_write_text(tmp / RESULT, json.dumps(dict(outcome), indent=2, sort_keys=True) + "\n")
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old, ignore_errors=True)
        return final
