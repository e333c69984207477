"""How fast the pipeline digests a published image: xxh3 (pipeline.hashing) against a plain read and MD5.

For every image in an artifacts directory's manifest.json (default artifacts/), after one warm-up read so that all
runs read from the page cache, it takes the best of --repeat runs of:

  plain read   the file read into a reused 1 MiB buffer, nothing else: the floor any digest pays
  xxh3         pipeline.hashing.xxh3_file, the digest the file checker and the build records use
  md5          hashlib.md5 over the same 1 MiB reads (what doit's default file checker computes)

    .venv/bin/python bench/hashing.py [--artifacts artifacts] [--repeat 5]

It prints MiB/s per method and image, then the ratios over all images (targets: xxh3 >= 0.8x plain read, >= 5x MD5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.hashing import xxh3_file  # noqa: E402 - after the path set-up, so the script runs from a checkout

CHUNK = 1 << 20


def plain_read(path: Path) -> str:
    buffer = bytearray(CHUNK)
    total = 0
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            total += n
    return str(total)


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


METHODS: dict[str, Callable[[Path], str]] = {"plain read": plain_read, "xxh3": xxh3_file, "md5": md5_file}


def best_seconds(method: Callable[[Path], str], path: Path, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        method(path)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    manifest = args.artifacts / "manifest.json"
    if not manifest.is_file():
        print(
            f"error: {manifest} not found: publish the images first (.venv/bin/doit domain=configs/demo build)",
            file=sys.stderr,
        )
        return 1
    images = [args.artifacts / r["file"] for r in json.loads(manifest.read_text())["artifacts"].values()]
    print(f"load average {os.getloadavg()[0]:.2f}; best of {args.repeat} runs, page cache warm")
    totals = dict.fromkeys(METHODS, 0.0)
    size_total = 0
    for image in images:
        plain_read(image)  # warm the page cache
        size = image.stat().st_size
        size_total += size
        cells = []
        for name, method in METHODS.items():
            seconds = best_seconds(method, image, args.repeat)
            totals[name] += seconds
            cells.append(f"{name} {size / seconds / 2**20:8.0f} MiB/s")
        print(f"{image.name} ({size / 2**20:.0f} MiB): " + ", ".join(cells))
    speed = {name: size_total / seconds for name, seconds in totals.items()}
    print(
        f"all images: xxh3 = {speed['xxh3'] / speed['plain read']:.2f}x plain read (target >= 0.8), "
        f"{speed['xxh3'] / speed['md5']:.1f}x MD5 (target >= 5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
