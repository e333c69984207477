"""Published artifacts: atomic writes, per-artifact records, `manifest.json` and `SHA256SUMS`.

Every file under artifacts/ is written to a temporary name in the same directory and renamed into place, so an
interrupted run leaves the previous file or none — never half of one.  Tasks record what they learned in
`<state>/records/<artifact>.json`; the manifest is rebuilt from those records under a lock, since tasks run in parallel.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"


class ArtifactError(Exception):
    """An artifact could not be published or does not match its record."""


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def publish_file(source: Path, dest: Path) -> tuple[str, str, int]:
    """Copy `source` to `dest` atomically, hashing while copying; returns (sha256, xxh3-128, size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    sha, xxh, size = hashlib.sha256(), xxhash.xxh3_128(), 0
    try:
        with source.open("rb") as src, tmp.open("wb") as out:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                xxh.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha.hexdigest(), xxh.hexdigest(), size


def publish_log(source: Path, dest: Path) -> None:
    """Keep a VM's console log under artifacts/ (atomically), whatever the outcome."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    if source.exists():
        shutil.copyfile(source, tmp)
    else:
        tmp.write_text("(the VM printed nothing)\n")
    tmp.replace(dest)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "records.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Records:
    """What the tasks learned about each artifact, and the manifest built from it."""

    def __init__(self, state_dir: Path, artifacts_dir: Path, domain_meta: dict[str, str]) -> None:
        self.dir = state_dir / "records"
        self.state_dir = state_dir
        self.artifacts_dir = artifacts_dir
        self.domain_meta = domain_meta

    def load(self, artifact: str) -> dict[str, Any]:
        path = self.dir / f"{artifact}.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def all(self) -> dict[str, dict[str, Any]]:
        if not self.dir.is_dir():
            return {}
        return {p.stem: self.load(p.stem) for p in sorted(self.dir.glob("*.json"))}

    def update(self, artifact: str, clear: tuple[str, ...] = (), **fields: Any) -> None:
        """Merge `fields` into the artifact's record (dropping the `clear` ones) and rebuild the manifest and sums."""
        with _locked(self.state_dir):
            record = self.load(artifact)
            for name in clear:
                record.pop(name, None)
            record.update(fields)
            atomic_write_text(self.dir / f"{artifact}.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
            self._write_manifest()

    def drop(self, keep: set[str]) -> None:
        """Forget records of artifacts the domain no longer has."""
        with _locked(self.state_dir):
            for path in self.dir.glob("*.json") if self.dir.is_dir() else []:
                if path.stem not in keep:
                    path.unlink()
            self._write_manifest()

    def _write_manifest(self) -> None:
        records = self.all()
        manifest = {**self.domain_meta, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "artifacts": records}
        atomic_write_text(self.artifacts_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        lines = []
        for record in records.values():
            if record.get("file") and record.get("sha256"):
                lines.append(f"{record['sha256']}  {record['file']}\n")
        atomic_write_text(self.artifacts_dir / SUMS, "".join(sorted(lines, key=lambda ln: ln.split()[1])))

    def rebuild(self) -> dict[str, Any]:
        with _locked(self.state_dir):
            self._write_manifest()
        manifest: dict[str, Any] = json.loads((self.artifacts_dir / MANIFEST).read_text())
        return manifest
