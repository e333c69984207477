"""How much `doit -n 2` gains on the boot tests: `doit -n 1 boot` against `doit -n 2 boot`, on one machine.

On a private copy of a domain (default configs/demo) and a private artifacts directory, it builds every image first
(`doit build`), then, for each job count, forgets the boot tasks (`doit forget boot:…`, so they run again while the
builds stay up to date — `doit -a` would re-run validate, eval and build too) and times `doit -n N boot`.

    .venv/bin/python bench/parallel_boot.py [--domain configs/demo] [--jobs 1 2] [--keep]

It prints one line per job count and the ratio of the first to the last; the exit code is non-zero if any doit run
fails.  The copy, its artifacts and its doit state are removed afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import ROOT, BenchError, executed

from pipeline.context import make_context
from pipeline.domain import load_domain

BUILD_TIMEOUT = 3 * 3600.0
BOOT_TIMEOUT = 1800.0


def doit(domain: Path, artifacts: Path, *args: str, timeout: float) -> tuple[float, str]:
    """benchlib.doit with an empty pass store of its own (CIM_RESULTS): a kept pass would be reused without a VM,
    and every boot in the comparison is to be a real one."""
    results = Path(tempfile.mkdtemp(prefix="cim-bench-results-"))
    try:
        return benchlib.doit(domain, artifacts, *args, timeout=timeout, env={"CIM_RESULTS": str(results)})
    finally:
        shutil.rmtree(results, ignore_errors=True)


def artifacts_of(domain: Path) -> list[str]:
    return [a.name for a in load_domain(domain).artifacts()]


def written_since(path: Path, since: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= since


def bench(domain: Path, artifacts: Path, jobs: list[int]) -> dict[int, float]:
    boots = [f"boot:{name}" for name in artifacts_of(domain)]
    seconds, _ = doit(domain, artifacts, "build", timeout=BUILD_TIMEOUT)
    print(f"built all images in {seconds:.1f} s (not part of the comparison)", flush=True)
    times: dict[int, float] = {}
    for n in jobs:
        doit(domain, artifacts, "forget", *boots, timeout=120)
        started = time.time()
        seconds, output = doit(domain, artifacts, "-n", str(n), "boot", timeout=BOOT_TIMEOUT)
        ran = set(executed(output))
        stale = [a for a in artifacts_of(domain) if not written_since(artifacts / a / "boot.log", started)]
        if stale or any(t.startswith(("build:", "eval:")) for t in ran):
            raise BenchError(
                f"doit -n {n} boot ran {sorted(ran)} and left {stale} unbooted; expected every boot "
                "to run and every build to be up to date"
            )
        times[n] = seconds
        print(f"doit -n {n} boot: {seconds:.1f} s ({', '.join(boots)})", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", type=Path, default=ROOT / "configs" / "demo", help="domain to copy")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="job counts to time, in order")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and doit state")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cim-bench-"))
    domain, artifacts = work / "domain", work / "artifacts"
    shutil.copytree(args.domain, domain, ignore=shutil.ignore_patterns("result*"))
    artifacts.mkdir()
    state = make_context(ROOT, domain, artifacts).state_dir
    try:
        times = bench(domain, artifacts, args.jobs)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work} and {state}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
    first, last = args.jobs[0], args.jobs[-1]
    print(f"ratio -n {first} / -n {last}: {times[first] / times[last]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
