"""Evaluation at NixOS cost: one `nix eval` for every host against N long-lived evaluators (pipeline.evalpool).

The synthetic domain's hosts each cost what a small NixOS system costs to evaluate: every host's configuration builds
a list of 2,000,000 strings and folds over it (about 0.9 s of CPU and a 450 MB peak on this machine for one host
alone), and keeps the list in its configuration (`config.heap`), as a NixOS configuration keeps its evaluated option
tree: a process that evaluates every host holds every host's heap.  Its `system.build.toplevel` is a derivation
named after the fold, so the work cannot be skipped.

From one run it prints, for H hosts (default 40):
  one process   the pipeline's own one-process evaluation (nix.eval_hosts): wall, CPU, peak resident memory
  N workers     EvalPool at 1, 2 and 4 workers under a memory limit (default 1 GiB for all evaluators together):
                wall, CPU, peak resident memory of all evaluators together (sampled every 25 ms), evaluators
                replaced, hosts stopped part-way and redone (the first hosts, before any host's cost is known)
  tight limit   2 workers under a limit smaller than two hosts' heap: every host still evaluates
  broken host   one host that throws, among the others: it fails alone, naming itself
and the ratios: 2 workers' wall / one process's (target <= 0.6), each peak against the limit.

    .venv/bin/python bench/eval_scale.py [--hosts 40] [--limit 1G] [--strings 2000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # puts the checkout on sys.path

from pipeline import evalpool, nix

FLAKE = """\
# bench/eval_scale.py: hosts that cost what a small NixOS system costs to evaluate (CPU and a retained heap).
{
  outputs = { self }:
    let
      strings = @STRINGS@;
      mkHost = name:
        if name == "@BROKEN@" then { config.system.build = throw "${name}: broken on purpose (bench/eval_scale.py)"; }
        else
          let
            heap = builtins.genList (i: "${name}-${toString i}") strings;
            weight = builtins.foldl' (acc: s: acc + builtins.stringLength s) 0 heap;
          in
          {
            config = {
              inherit heap;
              system.build.toplevel = derivation {
                name = "heavy-${name}-${toString weight}";
                system = "x86_64-linux";
                builder = "/bin/sh";
              };
            };
          };
      names = builtins.genList (i: "h${toString i}") @HOSTS@;
    in
    { nixosConfigurations = builtins.listToAttrs (map (name: { inherit name; value = mkHost name; }) names); };
}
"""


def make_flake(directory: Path, hosts: int, strings: int, broken: str = "") -> Path:
    directory.mkdir(parents=True)
    text = FLAKE.replace("@STRINGS@", str(strings)).replace("@HOSTS@", str(hosts)).replace("@BROKEN@", broken)
    (directory / "flake.nix").write_text(text)
    return directory


def children_usage() -> tuple[float, int]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def one_process(flake: Path, hosts: list[str]) -> dict[str, float]:
    """nix.eval_hosts: one `nix eval` for every host; its wall, CPU and peak resident memory (the kernel's count for
    waited-for children: the largest child so far, which is this one when it evaluates the most hosts)."""
    cpu0, _ = children_usage()
    started = time.monotonic()
    results = nix.eval_hosts(flake, hosts)
    wall = time.monotonic() - started
    cpu1, maxrss = children_usage()
    failed = [h for h, r in results.items() if isinstance(r, nix.NixError)]
    if failed:
        raise benchlib.BenchError(f"one process: {len(failed)} host(s) failed: {failed[:3]}")
    return {"wall": wall, "cpu": cpu1 - cpu0, "peak": maxrss}


def pool_run(
    flake: Path, hosts: list[str], workers: int, limit: int
) -> tuple[dict[str, float], dict[str, nix.EvalOutcome]]:
    pool = evalpool.EvalPool(flake, workers=workers, max_memory=limit)
    started = time.monotonic()
    futures = pool.submit(hosts)
    results = {h: f.result() for h, f in futures.items()}
    stats = pool.close()
    wall = time.monotonic() - started
    return {
        "wall": wall,
        "cpu": stats.cpu_seconds,
        "peak": stats.peak_rss,
        "replaced": stats.replaced,
        "preempted": stats.preempted,
        "growth": stats.growth,
    }, results


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=40)
    parser.add_argument("--limit", default="1G", help="memory limit for all evaluators together (default 1G)")
    parser.add_argument("--strings", type=int, default=2_000_000, help="strings each host's heap holds")
    args = parser.parse_args()
    limit = evalpool.parse_bytes(args.limit)
    hosts = [f"h{i}" for i in range(args.hosts)]
    with tempfile.TemporaryDirectory(prefix="cim-eval-scale-") as tmp:
        flake = make_flake(Path(tmp) / "flake", args.hosts, args.strings)
        # One host alone: what a host costs (and the Nix store copy of the flake is made before any timing).
        single = one_process(flake, hosts[:1])
        print(f"one host alone: {single['cpu']:.2f} s CPU, peak {gib(single['peak'])}")
        base = one_process(flake, hosts)
        print(
            f"one process, {args.hosts} hosts: wall {base['wall']:.1f} s, CPU {base['cpu']:.1f} s, "
            f"peak {gib(base['peak'])} ({'over' if base['peak'] > limit else 'under'} the limit {gib(limit)})"
        )
        runs = {}
        for workers in (1, 2, 4):
            figures, results = pool_run(flake, hosts, workers, limit)
            failed = [h for h, r in results.items() if isinstance(r, nix.NixError)]
            if failed:
                raise benchlib.BenchError(f"{workers} worker(s): {len(failed)} host(s) failed: {failed[:3]}")
            runs[workers] = figures
            print(
                f"{workers} worker(s), limit {gib(limit)}: wall {figures['wall']:.1f} s, CPU {figures['cpu']:.1f} s, "
                f"peak of all evaluators {gib(figures['peak'])}, {figures['replaced']} evaluator(s) replaced, "
                f"{figures['preempted']} host(s) stopped part-way and redone"
            )
        # A limit smaller than two hosts' heap: a worker is replaced after every host, and every host evaluates.
        tight = int(single["peak"] * 1.5 * 2)  # two workers, each a share of 1.5 hosts' peak
        figures, results = pool_run(flake, hosts, 2, tight)
        ok = sum(1 for r in results.values() if isinstance(r, dict))
        print(
            f"2 worker(s), limit {gib(tight)} (each worker's share under two hosts' peak): {ok} of {len(hosts)} hosts "
            f"evaluated, {figures['replaced']} evaluator(s) replaced, peak {gib(figures['peak'])}"
        )
        # One broken host among them: it fails alone, naming itself.
        broken = make_flake(Path(tmp) / "broken", args.hosts, args.strings // 20, broken="h7")
        figures, results = pool_run(broken, hosts, 2, limit)
        bad = {h: r for h, r in results.items() if isinstance(r, nix.NixError)}
        said = next(iter(bad.values())).report().splitlines() if bad else []
        print(
            f"one broken host among {len(hosts)}: {sorted(bad)} failed, {len(results) - len(bad)} evaluated; "
            f"its error: {' / '.join(line for line in said if 'broken on purpose' in line or 'failed' in line)[:200]}"
        )
        ratio = runs[2]["wall"] / base["wall"]
        print(
            json.dumps(
                {
                    "two_workers_wall_over_one_process": round(ratio, 3),
                    "target": 0.6,
                    "two_workers_peak_under_limit": runs[2]["peak"] < limit,
                    "every_pool_peak_under_limit": all(r["peak"] < limit for r in runs.values()),
                    "one_process_peak_over_limit": base["peak"] > limit,
                    "tight_limit_all_evaluated": ok == len(hosts),
                    "broken_alone": sorted(bad) == ["h7"],
                }
            )
        )
        under = all(r["peak"] < limit for r in runs.values())
        return 0 if ratio <= 0.6 and under and ok == len(hosts) and sorted(bad) == ["h7"] else 1


if __name__ == "__main__":
    sys.exit(main())
