"""The evaluator pool (pipeline.evalpool): real `nix repl` evaluators on small synthetic flakes; each host's result as
it comes, a broken host failing alone, evaluators replaced past their memory share, and the sizes it reads."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from cimtest.demo import DoitRunner, executed, needs_demo

from pipeline import evalpool, nix

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import eval_scale  # noqa: E402 - bench/ is not a package

needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="nix is not installed")


def test_sizes_and_workers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert evalpool.parse_bytes("1G") == 2**30
    assert evalpool.parse_bytes("512M") == 512 * 2**20
    assert evalpool.parse_bytes("1048576") == 2**20
    with pytest.raises(evalpool.EvalPoolError, match="CIM_EVAL_MAX_MEMORY='lots' is not a size"):
        evalpool.parse_bytes("lots")
    monkeypatch.setenv("CIM_EVAL_WORKERS", "3")
    assert evalpool.workers_default() == 3
    monkeypatch.setenv("CIM_EVAL_WORKERS", "0")
    with pytest.raises(evalpool.EvalPoolError, match="CIM_EVAL_WORKERS='0'"):
        evalpool.workers_default()
    monkeypatch.setenv("CIM_EVAL_MAX_MEMORY", "2G")
    assert evalpool.max_memory_default() == 2 * 2**30


@pytest.mark.nix
@needs_nix
def test_the_pool_gives_what_one_nix_eval_gives_and_a_broken_host_fails_alone(tmp_path: Path) -> None:
    flake = eval_scale.make_flake(tmp_path / "flake", 6, 1000, broken="h3")
    hosts = [f"h{i}" for i in range(6)]
    pool = evalpool.EvalPool(flake, workers=2, max_memory=2**30)
    results = {h: f.result() for h, f in pool.submit(hosts).items()}
    stats = pool.close()
    one = nix.eval_hosts(flake, hosts)
    for host in hosts:
        if host == "h3":
            assert isinstance(results[host], nix.NixError) and isinstance(one[host], nix.NixError)
            assert "h3: broken on purpose" in results[host].report()
        else:
            assert results[host] == one[host]
    assert stats.hosts == 6 and stats.replaced == 0


@pytest.mark.nix
@needs_nix
def test_each_host_resolves_as_it_is_done_not_with_the_slowest(tmp_path: Path) -> None:
    flake = tmp_path / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text(
        "{ outputs = { self }: let\n"
        "  slow = builtins.foldl' (a: s: a + builtins.stringLength s) 0 (builtins.genList toString 3000000);\n"
        '  drv = n: derivation { name = n; system = "x86_64-linux"; builder = "/bin/sh"; };\n'
        "in { nixosConfigurations = {\n"
        '  slow.config.system.build.toplevel = drv "slow-${toString slow}";\n'
        '  fast.config.system.build.toplevel = drv "fast";\n'
        "}; }; }\n"
    )
    pool = evalpool.EvalPool(flake, workers=2, max_memory=2**31)
    futures = pool.submit(["slow", "fast"])
    futures["fast"].result()
    fast_done = time.monotonic()
    assert not futures["slow"].done(), "the fast host waited for the slow one"
    futures["slow"].result()
    assert time.monotonic() > fast_done
    pool.close()


@pytest.mark.nix
@needs_nix
def test_evaluators_past_their_share_are_replaced_and_every_host_evaluates(tmp_path: Path) -> None:
    flake = eval_scale.make_flake(tmp_path / "flake", 6, 300_000)
    hosts = [f"h{i}" for i in range(6)]
    probe = evalpool.EvalPool(flake, workers=1, max_memory=2**34)
    probe.future("h0").result()
    one_host = probe.close().growth
    assert one_host > 10 * 2**20, f"a host of 300,000 strings should grow an evaluator by MBs, not {one_host}"
    # Each worker's share is smaller than two hosts' growth: a worker is replaced before its second host.
    pool = evalpool.EvalPool(flake, workers=2, max_memory=int(one_host * 1.5) * 2 + 2 * 64 * 2**20)
    results = {h: f.result() for h, f in pool.submit(hosts).items()}
    stats = pool.close()
    assert all(isinstance(r, dict) for r in results.values()), results
    assert stats.replaced >= 2, stats


@pytest.mark.nix
@needs_nix
def test_workers_that_together_would_pass_the_limit_are_held_under_it(tmp_path: Path) -> None:
    """Four workers under a limit that fits two hosts: the first four start at once (no host's cost is known yet),
    the watch stops the newest as they grow and queues their hosts again; every host is evaluated and the
    evaluators together stay under the limit."""
    flake = eval_scale.make_flake(tmp_path / "flake", 8, 1_000_000)
    hosts = [f"h{i}" for i in range(8)]
    probe = evalpool.EvalPool(flake, workers=1, max_memory=2**34)
    probe.future("h0").result()
    one = probe.close()
    assert one.growth > 100 * 2**20, f"a host of 1,000,000 strings should grow an evaluator by 100s of MB: {one}"
    limit = int(one.peak_rss * 2.5)
    pool = evalpool.EvalPool(flake, workers=4, max_memory=limit)
    results = {h: f.result() for h, f in pool.submit(hosts).items()}
    stats = pool.close()
    assert all(isinstance(r, dict) for r in results.values()), results
    assert stats.peak_rss < limit, (stats, limit)
    assert stats.hosts == 8 and stats.growth >= one.growth * 0.9, stats


@pytest.mark.nix
@needs_nix
def test_one_broken_host_among_forty_fails_only_its_eval(tmp_path: Path, doit: DoitRunner) -> None:
    from test_eval_batch import make_domain

    names = [f"host{i:02d}" for i in range(39)] + ["throws"]
    domain = make_domain(tmp_path / "domain", names)
    proc = doit(domain, "--continue", "eval", env={"CIM_EVAL_WORKERS": "2"})
    assert proc.returncode != 0
    ran = executed(proc.stdout)
    assert len([t for t in ran if t.startswith("eval:")]) == 40
    assert "[eval] 40 host(s) to evaluate: 2 evaluator(s)" in proc.stdout
    assert "throws: this host is broken on purpose" in proc.stdout + proc.stderr
    failed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("TaskFailed")]
    assert set(failed) == {"TaskFailed - taskid:eval:throws"}, failed
    assert json.loads((domain / "domain.json").read_text())["hosts"]["throws"]


@pytest.mark.nix
@needs_nix
def test_a_fault_of_the_pool_fails_each_host_instead_of_leaving_it_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flake = eval_scale.make_flake(tmp_path / "flake", 3, 1000)

    def fault(self: evalpool.Evaluator, host: str) -> nix.EvalOutcome:
        raise RuntimeError(f"a fault of the pool at {host}")

    monkeypatch.setattr(evalpool.Evaluator, "evaluate", fault)
    pool = evalpool.EvalPool(flake, workers=1, max_memory=2**30)
    futures = pool.submit(["h0", "h1", "h2"])
    for host, future in futures.items():
        with pytest.raises(RuntimeError, match=f"a fault of the pool at {host}"):
            future.result(timeout=60)
    assert pool.close().replaced == 3


@pytest.mark.nix
@needs_demo
def test_a_broken_host_fails_its_eval_while_another_hosts_image_builds(demo_domain: Path, doit: DoitRunner) -> None:
    flake = demo_domain / "flake.nix"
    every_host = "builtins.mapAttrs (name: host: mkHost name host [ ]) domain.hosts"
    assert every_host in flake.read_text()
    broken = (
        'builtins.mapAttrs (name: host: if name == "vhost-pi" '
        'then { config.system.build = throw "vhost-pi: broken on purpose"; } else mkHost name host [ ]) domain.hosts'
    )
    flake.write_text(flake.read_text().replace(every_host, broken))
    proc = doit(
        demo_domain, "-n", "2", "--continue", "build:vhost-dev-iso", "build:vhost-pi-sd", env={"CIM_EVAL_WORKERS": "2"}
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "vhost-pi: broken on purpose" in said and "'vhost-pi'" in said, said
    assert "nix-repl>" not in said and "cim-end" not in said, said  # the evaluator's prompt is not nix's words
    failed = {line for line in said.splitlines() if line.startswith("TaskFailed")}
    assert failed == {"TaskFailed - taskid:eval:vhost-pi"}, said
    ran = executed(proc.stdout)
    assert {"eval:vhost-dev", "build:vhost-dev-iso"} <= set(ran) and "build:vhost-pi-sd" not in ran, ran
    assert "[vhost-dev-iso] published vhost-dev-iso/" in proc.stdout, proc.stdout
