"""Content digests: xxh3-128 for caching (fast), sha256 for what users check with `sha256sum -c`.

`XXH3Checker` is doit's file checker for this project: a file whose (mtime, size) is unchanged is taken as
unchanged; otherwise its xxh3-128 decides, so a touched-but-identical file re-runs nothing.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import xxhash
from doit.dependency import FileChangedChecker

_CHUNK = 1 << 20
_MAP_CHUNK = 16 << 20  # per update() call: long enough to amortise the call, short enough to let other threads run


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _file_digest(path: Path, digest: _Digest) -> str:
    """Digest a file through a read-only mmap: no copy into Python buffers (bench/hashing.py: xxh3 over a 1 MiB
    read() loop ran at ~0.5-0.8x plain read speed, over mmap at or above it).  Empty and unmappable files are read."""
    with path.open("rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or not a regular file (a pipe, /proc)
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
        with mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, len(view), _MAP_CHUNK):
                    digest.update(view[start : start + _MAP_CHUNK])
            finally:
                view.release()
    return digest.hexdigest()


# Digests taken while a file was written (publish_file hashes what it copies): (device, inode, size, mtime in ns) →
# xxh3, so the stamp a task keeps of its published image does not read the image a second time.
_known: dict[tuple[int, int, int, int], str] = {}


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember_xxh3(path: Path, digest: str) -> None:
    """`digest` is the xxh3-128 of `path` as it is now: xxh3_file returns it while the file stays as it is."""
    _known[_identity(os.stat(path))] = digest


def xxh3_file(path: Path) -> str:
    """The xxh3-128 hex digest of a file's bytes (remembered for a file this process just wrote and hashed)."""
    try:
        known = _known.get(_identity(os.stat(path)))
    except OSError:
        known = None  # reading it says what is wrong
    return known or _file_digest(path, xxhash.xxh3_128())


def sha256_file(path: Path) -> str:
    return _file_digest(path, hashlib.sha256())


def xxh3_files(paths: Iterable[Path], base: Path) -> str:
    """One digest over several files: each file's path relative to `base`, then its content digest."""
    digest = xxhash.xxh3_128()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        digest.update(xxh3_file(path).encode() + b"\n")
    return digest.hexdigest()


def xxh3_text(*parts: str) -> str:
    """A digest of strings, e.g. an explicit list of what invalidates a cache."""
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


class XXH3Checker(FileChangedChecker):  # type: ignore[misc]
    """doit file checker: (mtime, size) fast path, then xxh3-128 of the content."""

    def check_modified(self, file_path: str, file_stat: os.stat_result, state: tuple[float, int, str]) -> bool:
        mtime, size, digest = state
        if file_stat.st_mtime == mtime and file_stat.st_size == size:
            return False
        if file_stat.st_size != size:
            return True
        return digest != xxh3_file(Path(file_path))

    def get_state(self, dep: str, current_state: tuple[float, int, str] | None) -> tuple[float, int, str] | None:
        stat = os.stat(dep)
        if current_state and current_state[0] == stat.st_mtime and current_state[1] == stat.st_size:
            return None
        return stat.st_mtime, stat.st_size, xxh3_file(Path(dep))
