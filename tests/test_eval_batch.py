"""Batched evaluation: one `nix eval` for many hosts, each host's result (or error) its own.

The nix tests evaluate a small synthetic flake for real: good hosts, a host whose evaluation throws (caught per host
by `tryEval`) and a host with a missing attribute (which `tryEval` cannot catch, so the batch is split).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from cimtest.demo import DoitRunner, executed

from pipeline import nix
from pipeline.context import needed_tasks, state_dir_for

ROOT = Path(__file__).resolve().parent.parent

needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="nix is not installed")

FLAKE = """\
{
  outputs = { self }:
    let
      domain = builtins.fromJSON (builtins.readFile ./domain.json);
      drv = name: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" ":" ]; };
      mkHost = hostName: host:
        if hostName == "throws" then { config.system.build = throw "throws: this host is broken on purpose"; }
        else if hostName == "missing" then { config.system.build.toplevel = (drv "m").noSuchAttribute; }
        else {
          config.system.build = {
            toplevel = drv "nixos-system-${hostName}";
            isoImage = drv "nixos-${hostName}.iso";
          };
        };
    in
    { nixosConfigurations = builtins.mapAttrs mkHost domain.hosts; };
}
"""


def make_domain(directory: Path, hosts: list[str]) -> Path:
    directory.mkdir()
    host = {
        "system": "x86_64-linux",
        "images": ["iso"],
        "hardware": {
            "vendor": "QEMU",
            "model": "pc",
            "cpu": {"model": "qemu64", "cores": 1},
            "memory_gib": 1,
            "disks": [{"name": "main", "device": "/dev/vda", "size_gib": 1}],
        },
    }
    domain = {
        "name": "batch",
        "fqdn": "batch.local",
        "hosts": {name: {**host, "address": f"192.168.23.{10 + i}"} for i, name in enumerate(hosts)},
    }
    (directory / "domain.json").write_text(json.dumps(domain, indent=1))
    (directory / "flake.nix").write_text(FLAKE)
    return directory


@pytest.fixture
def flake_domain(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Path] = []

    def make(hosts: list[str]) -> Path:
        made.append(make_domain(tmp_path / f"domain{len(made)}", hosts))
        return made[-1]

    yield make
    for domain in made:
        shutil.rmtree(state_dir_for(ROOT, domain), ignore_errors=True)


# -- pure -------------------------------------------------------------------------------------------------------------


def test_batch_apply_names_every_host_once_as_a_nix_string() -> None:
    expr = nix.batch_apply(["a-1", "b-2"])
    assert '[ "a-1" "b-2" ]' in expr
    assert "tryEval" in expr and "cs ? ${h}" in expr


def test_needed_tasks_follows_task_dep_and_setup_only_from_the_selection() -> None:
    def task(*deps: str, setup: tuple[str, ...] = ()) -> SimpleNamespace:
        return SimpleNamespace(task_dep=list(deps), setup_tasks=list(setup))

    tasks = {
        "validate": task(),
        "eval:a": task("validate"),
        "eval:b": task("validate"),
        "build:a-iso": task("eval:a"),
        "build:b-iso": task("eval:b"),
        "boot:a-iso": task("build:a-iso", setup=("prepare",)),
        "prepare": task(),
        "release": task("boot:a-iso", "build:b-iso"),
    }
    assert needed_tasks(tasks, ["boot:a-iso"]) == {"boot:a-iso", "build:a-iso", "eval:a", "validate", "prepare"}
    assert {"eval:a", "eval:b"} <= needed_tasks(tasks, ["release"])
    assert needed_tasks(tasks, ["nonexistent"]) == set()


# -- real nix ---------------------------------------------------------------------------------------------------------


@pytest.mark.nix
@needs_nix
def test_one_batch_gives_each_host_its_own_result(flake_domain) -> None:  # type: ignore[no-untyped-def]
    domain = flake_domain(["alpha", "beta", "throws", "missing", "gamma"])
    results = nix.eval_hosts(domain, ["alpha", "beta", "throws", "missing", "gamma", "absent"])

    for good in ("alpha", "beta", "gamma"):
        drvs = results[good]
        assert isinstance(drvs, dict), drvs
        assert set(drvs) == {"toplevel", "isoImage"}
        assert drvs["toplevel"].endswith(f"-nixos-system-{good}.drv")
        # the same drvPath a host gets when evaluated alone
        assert drvs == nix.eval_host(domain, good)

    for bad, said in (("throws", "broken on purpose"), ("missing", "noSuchAttribute"), ("absent", "absent")):
        error = results[bad]
        assert isinstance(error, nix.NixError), error
        assert f"'{bad}'" in error.message, error.message  # the error names its host
        assert said in error.report()
        for good in ("alpha", "beta", "gamma"):
            assert good not in error.report()


@pytest.mark.nix
@needs_nix
def test_doit_evaluates_all_hosts_in_one_batch_and_fails_only_the_broken_one(flake_domain, doit: DoitRunner) -> None:  # type: ignore[no-untyped-def]
    domain = flake_domain(["alpha", "beta", "gamma"])
    proc = doit(domain, "eval", check=True)
    assert sorted(executed(proc.stdout)) == ["eval:alpha", "eval:beta", "eval:gamma", "validate"]
    assert "[eval] 3 host(s) to evaluate: " in proc.stdout, proc.stdout

    # `doit -a` runs up-to-date evals too: all of them, queued together.
    proc = doit(domain, "-a", "eval", check=True)
    assert "[eval] 3 host(s) to evaluate: " in proc.stdout, proc.stdout

    # Targeting one host's eval evaluates only that host, even when the others are stale too.
    (domain / "flake.nix").write_text(FLAKE.replace("nixos-system-", "nixos-sys-"))
    proc = doit(domain, "eval:beta", check=True)
    assert executed(proc.stdout) == ["validate", "eval:beta"]
    assert "alpha" not in proc.stdout and "gamma" not in proc.stdout
    assert re.search(r"\[eval:beta\] toplevel = /nix/store/\S+-nixos-sys-beta\.drv", proc.stdout)

    # One host made to fail: its task fails naming it; with --continue the others still get their drvPaths.
    data = json.loads((domain / "domain.json").read_text())
    data["hosts"]["missing"] = {**data["hosts"]["alpha"], "address": "192.168.23.99"}
    (domain / "domain.json").write_text(json.dumps(data))
    proc = doit(domain, "--continue", "eval")
    assert proc.returncode != 0
    assert "'missing'" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    ran = executed(proc.stdout)
    assert {"eval:alpha", "eval:beta", "eval:gamma", "eval:missing"} <= set(ran)
    for good in ("alpha", "beta", "gamma"):
        assert re.search(rf"\[eval:{good}\] toplevel = /nix/store/\S+-nixos-sys-{good}\.drv", proc.stdout)
    assert "[eval] 4 host(s) to evaluate: " in proc.stdout
