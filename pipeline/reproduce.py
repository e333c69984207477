"""Reproducibility: rebuild an image's derivation and the ones it is made from, and say what differs, if anything.

`nix build --rebuild` rebuilds only the derivation it is given, so the check walks the image's derivation and its
nearest non-fixed-output inputs (the system closure, the initrd…) and rebuilds each.  A mismatch is reported by the
first file (in sorted order) whose bytes differ between the valid output and Nix's `.check` copy, with the offset of
the first differing byte.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import nix

CHUNK = 1 << 20


def _entries(root: Path) -> Iterator[tuple[str, Path]]:
    """(path relative to root, path) of every entry under root, sorted; root itself as '.' when it is a file."""
    if not root.is_dir() or root.is_symlink():
        yield ".", root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            yield str(path.relative_to(root)), path


def _first_byte_difference(a: Path, b: Path) -> int | None:
    offset = 0
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                n = min(len(ca), len(cb))
                return offset + next((i for i in range(n) if ca[i] != cb[i]), n)
            if not ca:
                return None
            offset += len(ca)


def first_difference(a: Path, b: Path) -> str | None:
    """The first difference between two trees, in words ('iso/x.iso: byte 32768 differs'), or None when equal.

    Compared: the set of entries, their kinds, executable bits, symlink targets and file bytes (what a NAR holds).
    """
    left, right = dict(_entries(a)), dict(_entries(b))
    for rel in sorted(left.keys() | right.keys()):
        if rel not in right:
            return f"{rel}: only in the first build"
        if rel not in left:
            return f"{rel}: only in the rebuild"
        sa, sb = left[rel].lstat(), right[rel].lstat()
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            return f"{rel}: a {_kind(sa.st_mode)} in the first build, a {_kind(sb.st_mode)} in the rebuild"
        if stat.S_ISLNK(sa.st_mode):
            if os.readlink(left[rel]) != os.readlink(right[rel]):
                return f"{rel}: symlink targets differ"
        elif stat.S_ISREG(sa.st_mode):
            if (sa.st_mode & 0o111 != 0) != (sb.st_mode & 0o111 != 0):
                return f"{rel}: executable in one build only"
            if sa.st_size != sb.st_size:
                return f"{rel}: {sa.st_size} bytes in the first build, {sb.st_size} in the rebuild"
            offset = _first_byte_difference(left[rel], right[rel])
            if offset is not None:
                return f"{rel}: byte {offset} differs"
    return None


def _kind(mode: int) -> str:
    return "directory" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "file"


@dataclass
class CheckResult:
    """What a reproducibility check found; `record()` is what the manifest keeps."""

    reproducible: bool
    derivations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    derivation: str = ""  # the first one that differed
    differs: str = ""  # its first differing file, in words

    def record(self, sha256: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reproducible": self.reproducible,
            "sha256": sha256,
            "derivations": self.derivations,
            "seconds": self.seconds,
        }
        if not self.reproducible:
            out.update(derivation=self.derivation, differs=self.differs)
        return out


def check(
    drv_path: str, *, options: Sequence[str] = (), limit: int = 8, progress: Callable[[str], None] = lambda _line: None
) -> CheckResult:
    """Rebuild `drv_path` and the derivations it is made from; stop at the first that is not reproducible."""
    started = time.monotonic()
    drvs = nix.built_from(drv_path, limit)
    result = CheckResult(reproducible=True)
    for drv in drvs:
        nix.build(drv, options=options)  # --rebuild needs a valid output to compare with
        progress(f"rebuilding {drv}")
        rebuilt = nix.rebuild(drv, options=options)
        result.derivations.append(drv)
        if not rebuilt.reproducible:
            result.reproducible = False
            result.derivation = drv
            differs = None
            if rebuilt.differing and Path(rebuilt.differing).exists():
                differs = first_difference(Path(rebuilt.output), Path(rebuilt.differing))
                # Not a valid store path, just Nix's copy for us to compare: gone once compared (GC removes it
                # where this user may not).
                shutil.rmtree(rebuilt.differing, ignore_errors=True)
            result.differs = differs or f"output {rebuilt.output} differs (nix kept no copy to compare)"
            if rebuilt.build_dir:  # the other half of --keep-failed: the rebuild's directory under /tmp
                shutil.rmtree(rebuilt.build_dir, ignore_errors=True)
            break
    result.seconds = round(time.monotonic() - started, 1)
    return result
