"""The nix-eval-jobs backend (pipeline.evaljobs): the command it builds, its lines read into per-host results, the
choice of evaluator.

nix-eval-jobs cannot be built on Debian 12 (no Nix headers), so its lines here are recorded in the shape its README
shows and its src/worker.cc writes (attr, attrPath, drvPath, outputs; `extraValue` from --apply; `error`); the
expression it is given is evaluated by the real Nix CLI, and by nix-eval-jobs itself where it is installed (the cim
job in CI).  No stand-in for nix-eval-jobs is run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import evaljobs, evalpool, nix, process

needs_nix = pytest.mark.skipif(shutil.which("nix") is None, reason="nix is not installed")
needs_nix_eval_jobs = pytest.mark.skipif(shutil.which("nix-eval-jobs") is None, reason="nix-eval-jobs not installed")

DOMAIN = Path("/srv/domain")
TOPLEVEL = "/nix/store/2h9axmm661s4qa74jmvs56vpmcf09pxi-nixos-system-vhost-dev.drv"
ISO = "/nix/store/bxvhwa6v5h0j4rswxzjc7s8ccazmqkis-nixos-vhost-dev-x86_64-linux.iso.drv"


def line(host: str, **fields: object) -> str:
    """A line as nix-eval-jobs prints a host's job: attr, attrPath, then the derivation's fields or `error`."""
    job: dict[str, object] = {"attr": host, "attrPath": [host]}
    if "error" not in fields:
        job |= {
            "drvPath": TOPLEVEL,
            "name": f"nixos-system-{host}",
            "outputs": {"out": f"/nix/store/0i6ir4c8ybqxhyz2gvqvk4r9xp0b6dp1-nixos-system-{host}"},
            "system": "x86_64-linux",
        }
    return json.dumps(job | fields)


def test_the_command_names_exactly_the_hosts_asked_with_each_workers_share_in_mib() -> None:
    argv = evaljobs.command(DOMAIN, Path("/tmp/cim-eval-jobs-x/hosts.json"), 2, workers=4, max_memory=8 * 2**30)
    assert argv[0] == "nix-eval-jobs"
    assert argv[argv.index("--workers") + 1] == "2"  # no more workers than hosts
    assert argv[argv.index("--max-memory-size") + 1] == "2048"  # 8 GiB for 4 workers: 2048 MiB each
    assert "--impure" in argv  # getFlake of a path: flake is not locked
    assert argv[argv.index("--apply") + 1] == evaljobs.APPLY
    assert argv[-2] == "--expr"
    expr = argv[-1]
    assert '(builtins.getFlake "path:/srv/domain").nixosConfigurations' in expr
    assert 'builtins.fromJSON (builtins.readFile "/tmp/cim-eval-jobs-x/hosts.json")' in expr  # the hosts asked
    assert nix.EVALUATED_ATTRIBUTES in expr  # the attributes the repl scheme evaluates


def test_the_command_stays_small_for_ten_thousand_hosts() -> None:
    argv = evaljobs.command(DOMAIN, Path("/tmp/hosts.json"), 10_000, workers=64, max_memory=2**36)
    assert max(len(arg.encode()) for arg in argv) < 128 * 1024  # MAX_ARG_STRLEN: one argument, at most 128 KiB


def test_memory_share_and_nix_strings() -> None:
    assert evaljobs.memory_mib(2**30, 4) == 256
    assert evaljobs.memory_mib(2**20, 8) == 1  # never 0: nix-eval-jobs would restart a worker after every job
    assert evaljobs.nix_string('a${b}"c') == '"a\\${b}\\"c"'


def test_a_hosts_line_gives_what_the_repl_scheme_gives() -> None:
    drvs = {"toplevel": TOPLEVEL, "isoImage": ISO}
    assert evaljobs.read_line(line("vhost-dev", extraValue=drvs), DOMAIN) == ("vhost-dev", drvs)
    assert evaljobs.read_line("", DOMAIN) is None
    assert evaljobs.read_line("warning: not JSON", DOMAIN) is None


def test_an_error_fails_its_own_host_with_nixs_words() -> None:
    batch = evaljobs.Batch(DOMAIN, ["good", "broken", "late"])
    said = "error:\n       … while evaluating the attribute 'config.system.build'\n       error: broken on purpose"
    broken = batch.take(line("broken", error=said))
    good = batch.take(line("good", extraValue={"toplevel": TOPLEVEL}))
    assert good == {"good": {"toplevel": TOPLEVEL}}
    error = broken["broken"]
    assert isinstance(error, nix.NixError)
    assert "nix eval of host 'broken' (path:/srv/domain#nixosConfigurations.broken" in error.report()
    assert "broken on purpose" in error.report()
    assert list(batch.pending) == ["late"]
    assert batch.take(line("good", extraValue={"toplevel": TOPLEVEL})) == {}  # a host resolves once


def test_a_host_without_toplevel_and_a_too_old_nix_eval_jobs() -> None:
    batch = evaljobs.Batch(DOMAIN, ["odd", "old", "none"])
    odd = batch.take(line("odd", extraValue={"isoImage": ISO}))["odd"]
    assert isinstance(odd, nix.NixError) and "has no toplevel derivation" in odd.message
    old = batch.take(line("old"))["old"]  # no --apply: no extraValue
    assert isinstance(old, nix.NixError) and "2.26 or newer" in old.hint
    # A host whose value is no derivation prints no line: once nix-eval-jobs ends well, host_drvs says why.
    none = batch.end(0, "")["none"]
    assert isinstance(none, nix.NixError) and "is 'none' a nixosConfiguration" in none.message


def test_an_early_exit_fails_only_the_hosts_still_pending() -> None:
    batch = evaljobs.Batch(DOMAIN, ["a", "b", "c"])
    assert batch.take(line("a", extraValue={"toplevel": TOPLEVEL})) == {"a": {"toplevel": TOPLEVEL}}
    ended = batch.end(1, "error: while checking worker process, evaluation worker got killed by signal 9")
    assert set(ended) == {"b", "c"}
    assert all(isinstance(e, nix.NixError) for e in ended.values())
    assert "nix-eval-jobs exited with status 1 before the host was evaluated" in ended["b"].report()
    assert "killed by signal 9" in ended["c"].report()
    stopped = evaljobs.Batch(DOMAIN, ["d"]).end(None, "", evalpool.EvalPoolError("nix-eval-jobs gave no result."))
    assert "nix eval of host 'd' failed: nix-eval-jobs gave no result." in stopped["d"].report()


def test_an_error_of_the_whole_expression_fails_every_pending_host() -> None:
    batch = evaljobs.Batch(DOMAIN, ["a", "b"])
    done = batch.take(json.dumps({"attr": "", "attrPath": [], "error": "error: syntax error, unexpected '}'"}))
    assert set(done) == {"a", "b"} and "unexpected '}'" in done["a"].report()
    assert not batch.pending


def test_lines_split_across_reads() -> None:
    lines, rest = evaljobs.split_lines(b'{"attr":"a"}\n{"at', b'tr":"b"}\n\n{"attr"')
    assert lines == ['{"attr":"a"}', '{"attr":"b"}'] and rest == b'{"attr"'


def test_the_chooser() -> None:
    found = {"nix-eval-jobs": "/nix/var/nix/profiles/default/bin/nix-eval-jobs"}.get
    missing: dict[str, str] = {}
    assert evaljobs.choose({}, found) is evaljobs.Backend.nix_eval_jobs
    assert evaljobs.choose({}, missing.get) is evaljobs.Backend.repl
    assert evaljobs.choose({"CIM_EVALUATOR": "repl"}, found) is evaljobs.Backend.repl
    assert evaljobs.choose({"CIM_EVALUATOR": " Nix-Eval-Jobs "}, found) is evaljobs.Backend.nix_eval_jobs
    with pytest.raises(evalpool.EvalPoolError) as forced:
        evaljobs.choose({"CIM_EVALUATOR": "nix-eval-jobs"}, missing.get)
    assert forced.value.report() == (
        "CIM_EVALUATOR=nix-eval-jobs, but nix-eval-jobs is not on PATH. Install it (e.g. nix profile install "
        "nixpkgs#nix-eval-jobs), or unset CIM_EVALUATOR to evaluate with the pipeline's own `nix repl` evaluators."
    )
    with pytest.raises(evalpool.EvalPoolError, match="CIM_EVALUATOR='hydra' is not an evaluator"):
        evaljobs.choose({"CIM_EVALUATOR": "hydra"}, found)


def test_the_log_says_which_evaluator_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = evaljobs.JobsPool(DOMAIN, workers=2, max_memory=2**31)
    assert evaljobs.describe(jobs).startswith("nix-eval-jobs (")
    assert "2 worker(s)" in evaljobs.describe(jobs) and "(1024 MiB per worker)" in evaljobs.describe(jobs)
    repl = evalpool.EvalPool(DOMAIN, workers=2, max_memory=2**31)
    monkeypatch.setenv("CIM_EVALUATOR", "repl")
    assert "each a long-lived `nix repl` (CIM_EVALUATOR=repl: " in evaljobs.describe(repl)
    monkeypatch.delenv("CIM_EVALUATOR")
    assert "(nix-eval-jobs is not installed: " in evaljobs.describe(repl)


FLAKE = """\
{
  outputs = { self }:
    let drv = name: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; };
    in {
      nixosConfigurations = {
        good.config.system.build = { toplevel = drv "nixos-system-good"; isoImage = drv "good.iso"; other = 1; };
        throws.config.system.build = throw "throws: broken on purpose";
        bare.config.system.build = { isoImage = drv "bare.iso"; };
      };
    };
}
"""


def flake(directory: Path) -> Path:
    directory.mkdir()
    (directory / "flake.nix").write_text(FLAKE)
    return directory


@pytest.mark.nix
@needs_nix
def test_each_job_applied_by_nix_gives_what_nix_eval_gives(tmp_path: Path) -> None:
    """The expression and --apply as nix-eval-jobs gets them, evaluated per job by Nix's own CLI."""
    domain = flake(tmp_path / "flake")
    names = tmp_path / "hosts.json"
    names.write_text(json.dumps(["good", "throws", "bare"]))
    expr = evaljobs.expression(domain, names)

    def job(host: str, then: str) -> str:
        proc = process.run(
            ["nix", *nix.FEATURES, "eval", "--impure", "--json", "--expr", f"({then}) ({expr}).{host}"], timeout=120
        )
        assert proc.returncode == 0 or host == "throws", proc.stderr
        return proc.stdout.strip() if proc.returncode == 0 else proc.stderr

    assert json.loads(job("good", evaljobs.APPLY)) == nix.eval_hosts(domain, ["good"])["good"]
    assert json.loads(job("good", "j: j.type")) == "derivation"  # a job nix-eval-jobs prints, not recurses into
    assert "throws: broken on purpose" in job("throws", evaljobs.APPLY)
    assert job("bare", "j: j") == "null"  # no job: host_drvs' error once the process ends
    names_asked = ["nix", *nix.FEATURES, "eval", "--impure", "--json", "--expr", f"builtins.attrNames ({expr})"]
    assert json.loads(process.run(names_asked, timeout=120).stdout) == ["bare", "good", "throws"]


@pytest.mark.nix
@needs_nix
@needs_nix_eval_jobs
def test_nix_eval_jobs_gives_what_nix_eval_gives_and_a_broken_host_fails_alone(tmp_path: Path) -> None:
    domain = flake(tmp_path / "flake")
    pool = evaljobs.JobsPool(domain, workers=2, max_memory=2**31)
    results = {h: f.result() for h, f in pool.submit(["good", "throws", "bare"]).items()}
    stats = pool.close()
    assert results["good"] == nix.eval_hosts(domain, ["good"])["good"]
    assert isinstance(results["throws"], nix.NixError)
    assert "throws: broken on purpose" in results["throws"].report()
    assert isinstance(results["bare"], nix.NixError) and "no toplevel derivation" in results["bare"].message
    assert stats.hosts == 3 and stats.peak_rss > 0
