"""The one funnel for `nix`: evaluate, build, read the configuration, and choose how an image's system gets built.

Only CLI common to Nix 2.8 (Debian 12) and current 2.2x is used: `nix eval --json`, `nix build --json --no-link`,
`nix show-config --json`.  The one difference handled is how a derivation's output is named on the command line
(a bare `drv` before 2.13, `drv^out` after).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.domain import Builder, Sandbox, Strategy, System
from pipeline.errors import CimError
from pipeline.process import ProcessTimeout, run

FEATURES = ["--extra-experimental-features", "nix-command flakes"]
SANDBOX_VARIABLE = "CIM_SANDBOX"
EVAL_TIMEOUT = 600.0
BUILD_TIMEOUT = 3 * 3600.0
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


class NixError(CimError):
    """A nix command failed; the message names what was asked and ends with the tail of nix's own words."""

    def __init__(self, what: str, stderr: str = "", hint: str = "") -> None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(what, hint, f"nix said:\n{tail}" if tail else "")
        self.stderr = stderr


def flake_ref(domain_dir: Path) -> str:
    """The flake of a domain directory, by path (so files git does not track, like the demo's inputs.json, count)."""
    return f"path:{domain_dir.resolve()}"


@functools.cache
def version() -> tuple[int, ...]:
    """Nix's version, e.g. (2, 8, 0)."""
    try:
        out = run(["nix", "--version"], timeout=30).stdout
    except FileNotFoundError:
        raise NixError("nix is not installed.", hint="Run scripts/setup.sh (Debian's nix-bin) and try again.") from None
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise NixError(f"cannot read the Nix version from {out!r}.")
    return tuple(int(g or 0) for g in match.groups())


def sandbox_mode() -> Sandbox:
    """The sandbox the user asked for: CIM_SANDBOX = on (the default) | relaxed | off."""
    value = os.environ.get(SANDBOX_VARIABLE, "").strip().lower() or Sandbox.on.value
    try:
        return Sandbox(value)
    except ValueError:
        raise NixError(
            f"{SANDBOX_VARIABLE}={value!r} is not a sandbox mode.",
            hint=f"Use {SANDBOX_VARIABLE}=on (the default), relaxed or off.",
        ) from None


@functools.cache
def user_namespaces() -> tuple[bool, str]:
    """Can this process create a user namespace, as Nix's sandbox does for every build?  (yes, what was seen)

    Refused in a chroot (the kernel's rule for CLONE_NEWUSER) and in containers that forbid them; Nix 2.8 then fails
    every sandboxed build, `relaxed` included, rather than fall back (measured in a chroot, sandbox-fallback on).
    """
    try:
        proc = run(["unshare", "--user", "true"], timeout=30)
    except FileNotFoundError:
        return True, "util-linux's unshare is not installed: not checked"  # nix's own error will say it, if any
    return proc.returncode == 0, (proc.stderr.strip() or f"exit {proc.returncode}")


def sandbox_settings() -> tuple[Sandbox, list[str]]:
    """The sandbox mode of this run's builds and the options that ask Nix for it (per invocation: a user's
    nix.conf is never changed).  Before the first build, where Nix cannot sandbox and the user did not choose
    `off`: one paragraph saying why, what it means and the choice."""
    mode = sandbox_mode()
    if mode is not Sandbox.off:
        able, seen = user_namespaces()
        if not able:
            raise NixError(
                "Nix cannot sandbox builds on this machine: this process may not create a user namespace "
                f"(unshare --user: {seen}), which every sandboxed Nix build needs — the case in a container that "
                "forbids user namespaces and in a chroot. Every build would fail with nix's 'user namespaces are not "
                "enabled'. Built without the sandbox, images are not hermetic (a builder could read this machine's "
                "/usr or the network) and `check:` cannot prove them reproducible.",
                hint=f"Run where user namespaces are allowed (a VM, or a container that permits them), or choose "
                f"{SANDBOX_VARIABLE}=off to build without the sandbox; the manifest's build info then says "
                f'"sandbox": "off". ({SANDBOX_VARIABLE}=relaxed is Nix\'s relaxed sandbox: it needs user namespaces '
                "too.)",
            )
    return mode, ["--option", "sandbox", mode.nix_value]


def output_installable(drv_path: str, output: str = "out") -> str:
    """How `nix build` is told to build a store derivation's output.

    Nix >= 2.13 takes `drv^out` (a bare .drv path now means the .drv file itself); older Nix, 2.8 included, builds
    the outputs of a bare .drv path and knows no `^`.
    """
    return f"{drv_path}^{output}" if version() >= (2, 13) else drv_path


def _run_nix(
    args: Sequence[str],
    what: str,
    timeout: float,
    options: Sequence[str] = (),
    hint: str = "",
    log_file: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The funnel: `nix <options> <args>` with flakes on, a deadline, and NixError carrying nix's own words; with
    `log_file`, nix's stderr (its build log) is written there as it comes."""
    argv = ["nix", *FEATURES, *options, *args]
    try:
        proc = run(argv, timeout=timeout, stderr_file=log_file)
    except FileNotFoundError:
        raise NixError("nix is not installed.", hint="Run scripts/setup.sh and try again.") from None
    except ProcessTimeout as exc:
        raise NixError(f"{what} did not finish within {timeout:g} s.", exc.output) from None
    if proc.returncode != 0:
        raise NixError(f"{what} failed (exit {proc.returncode}).", proc.stderr, hint)
    return proc


def _nix(args: Sequence[str], what: str, timeout: float, options: Sequence[str] = ()) -> str:
    return _run_nix(args, what, timeout, options).stdout


def eval_json(*installable: str, apply: str | None = None, timeout: float = EVAL_TIMEOUT) -> Any:
    """`nix eval --json INSTALLABLE… [--apply F]`, parsed."""
    args = ["eval", "--json", *installable, *(["--apply", apply] if apply else [])]
    return json.loads(_nix(args, f"nix eval {' '.join(installable)}", timeout))


def eval_expr_json(expr: str, *, timeout: float = EVAL_TIMEOUT) -> Any:
    """`nix eval --json --impure --expr EXPR` (impure: it reads a flake by its path, `builtins.getFlake`)."""
    return json.loads(_nix(["eval", "--json", "--impure", "--expr", expr], "nix eval --expr", timeout))


def _nix_store(args: Sequence[str], what: str, failed: str, timeout: float = 120.0) -> str:
    """`nix-store ARGS` with a deadline; its stdout, or NixError saying `what` did not finish or `failed`."""
    try:
        proc = run(["nix-store", *args], timeout=timeout)
    except FileNotFoundError:
        raise NixError("nix-store is not installed.", hint="Run scripts/setup.sh and try again.") from None
    except ProcessTimeout as exc:
        raise NixError(f"{what} did not finish within {timeout:g} s.", exc.output) from None
    if proc.returncode != 0:
        raise NixError(failed, proc.stderr)
    return proc.stdout


def closure(path: str) -> list[str]:
    """The store paths `path` refers to, itself included (`nix-store -qR`: the same text on every Nix)."""
    return _nix_store(
        ["--query", "--requisites", path], f"nix-store -qR {path}", f"nix-store -qR {path} failed."
    ).split()


def eval_file_json(path: Path, *, apply: str | None = None, timeout: float = EVAL_TIMEOUT) -> Any:
    """`nix eval --json --file PATH` (a plain Nix file such as a disk-config.nix, not a flake)."""
    return eval_json("--file", str(path), "", apply=apply, timeout=timeout)


# The image attributes the pipeline knows; intersectAttrs keeps nix from evaluating the rest of system.build.
EVALUATED_ATTRIBUTES = _HOST_ATTRS = (
    "b: builtins.mapAttrs (n: v: v.drvPath) "
    "(builtins.intersectAttrs { toplevel = 1; isoImage = 1; sdImage = 1; netboot = 1; } b)"
)


def _unreachable(exc: NixError) -> bool:
    """Nix could not fetch the flake's inputs (offline): every host fails alike, for a reason no host owns."""
    return "unable to download" in exc.stderr or "Couldn't resolve host" in exc.stderr


def _unreachable_error(domain_dir: Path, what: str, exc: NixError) -> NixError:
    return NixError(
        f"nix eval of {what} failed: the flake's inputs ({domain_dir / 'flake.nix'}) cannot be fetched from "
        "this machine. Run where nixpkgs is reachable (the cim domain is evaluated in GitHub Actions), "
        "or commit a flake.lock and prefetch its inputs; offline, use the demo: doit domain=configs/demo.",
        exc.stderr,
    )


# nixpkgs' lib/minver.nix (nixos-unstable, 2026): a Nix older than this refuses to evaluate nixpkgs at all, with a
# message about nixpkgs, not about this machine.  Debian 12's nix-bin is 2.8.
NIXPKGS_MIN_NIX = (2, 18)
_NIXPKGS_INPUT = re.compile(r"^\s*(inputs\.)?nixpkgs(\.url)?\s*=", re.M)


def check_nix_for_flake(domain_dir: Path) -> None:
    """Before any evaluation: a flake with a nixpkgs input needs the Nix nixpkgs needs; NixError naming both."""
    flake = domain_dir / "flake.nix"
    try:
        text = flake.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    if not _NIXPKGS_INPUT.search(text):
        return
    have = version()
    if have < NIXPKGS_MIN_NIX:
        need = ".".join(map(str, NIXPKGS_MIN_NIX))
        raise NixError(
            f"{flake}: its nixpkgs input needs Nix {need} or newer (nixpkgs' lib/minver.nix), and this machine's Nix "
            f"is {'.'.join(map(str, have))}.",
            hint=f"Install Nix {need} or newer (Debian 13's nix-bin, or the Nix installer from nixos.org) and run "
            "again; on this Nix, the demo domain evaluates: doit domain=configs/demo.",
        )


def host_drvs(host: str, result: Any, installable: str) -> dict[str, str]:
    """One host's evaluated image attributes → {attribute: drvPath}; NixError without a toplevel."""
    if not isinstance(result, dict) or "toplevel" not in result:
        raise NixError(f"{installable} has no toplevel derivation; is '{host}' a nixosConfiguration of the flake?")
    return {str(k): str(v) for k, v in result.items()}


def eval_host(domain_dir: Path, host: str) -> dict[str, str]:
    """The derivation paths of a host: {'toplevel': …, 'isoImage': …, 'sdImage': …, 'netboot': …}, those it has."""
    installable = f"{flake_ref(domain_dir)}#nixosConfigurations.{host}.config.system.build"
    check_nix_for_flake(domain_dir)
    try:
        result = eval_json(installable, apply=_HOST_ATTRS)
    except NixError as exc:
        if _unreachable(exc):
            raise _unreachable_error(domain_dir, host, exc) from None
        raise NixError(f"nix eval of host '{host}' ({installable}) failed.", exc.stderr) from None
    return host_drvs(host, result, installable)


def batch_apply(hosts: Sequence[str]) -> str:
    """The `--apply` function that maps `nixosConfigurations` to {host: drvPaths or null} for `hosts`.

    A host whose evaluation throws (`throw`, a failed `assert`) or that is not in the flake comes back null, so it
    fails alone; errors `tryEval` cannot catch (a missing attribute, a type error, `abort`) fail the whole batch.
    """
    names = " ".join(json.dumps(h) for h in hosts)  # host names are DNS labels: JSON strings are Nix strings
    return (
        "cs: let attrs = " + _HOST_ATTRS + "; "
        "one = h: if cs ? ${h} then (let r = builtins.tryEval (let v = attrs cs.${h}.config.system.build; "
        "in builtins.deepSeq v v); in if r.success then r.value else null) else null; "
        f"in builtins.listToAttrs (map (h: {{ name = h; value = one h; }}) [ {names} ])"
    )


EvalOutcome = dict[str, str] | NixError


def eval_hosts(domain_dir: Path, hosts: Sequence[str]) -> dict[str, EvalOutcome]:
    """The derivation paths of many hosts from one `nix eval` process (another for each further 100 KB of host
    names: one argument may not pass 128 KiB): {host: drvPaths, or the NixError naming it}.

    One host's error does not hide the others' results.  A host the batch reports as failed (null) is evaluated on
    its own for nix's words about it; a batch that fails as a whole (an error `tryEval` does not catch) is split in
    halves until the failing hosts stand alone, so one bad host among n costs about 2·log2(n) extra evaluations.
    """
    results: dict[str, EvalOutcome] = {}
    installable = f"{flake_ref(domain_dir)}#nixosConfigurations"
    try:
        check_nix_for_flake(domain_dir)
    except NixError as exc:  # every host's eval:<host> says it, before any evaluation
        return dict.fromkeys(hosts, exc)

    def alone(host: str) -> None:
        try:
            results[host] = eval_host(domain_dir, host)
        except NixError as exc:
            results[host] = exc

    def batch(group: Sequence[str]) -> None:
        if len(group) == 1:
            alone(group[0])
            return
        try:
            out = eval_json(installable, apply=batch_apply(group))
        except NixError as exc:
            if _unreachable(exc):
                error = _unreachable_error(domain_dir, f"{len(group)} host(s)", exc)
                results.update(dict.fromkeys(group, error))
                return
            half = len(group) // 2
            batch(group[:half])
            batch(group[half:])
            return
        for host in group:
            value = out.get(host) if isinstance(out, dict) else None
            if value is None:
                alone(host)
            else:
                try:
                    results[host] = host_drvs(host, value, f"{installable}.{host}.config.system.build")
                except NixError as exc:
                    results[host] = exc

    for chunk in argument_chunks(list(dict.fromkeys(hosts))):
        batch(chunk)
    return results


ARGUMENT_BYTES = 100_000  # Linux refuses one argument longer than 128 KiB (MAX_ARG_STRLEN)


def argument_chunks(hosts: list[str]) -> Iterator[list[str]]:
    """`hosts` in runs whose names fit one `--apply` argument (past ~4,000 names one would not)."""
    chunk: list[str] = []
    size = 0
    for host in hosts:
        if chunk and size + len(host) + 3 > ARGUMENT_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(host)
        size += len(host) + 3  # quoted, then a space
    if chunk:
        yield chunk


@dataclass(frozen=True)
class BuildResult:
    drv_path: str
    outputs: dict[str, str]
    log: str
    sandbox: Sandbox = Sandbox.on


def build(
    drv_path: str,
    *,
    options: Sequence[str] = (),
    timeout: float = BUILD_TIMEOUT,
    hint: str = "",
    log_file: Path | None = None,
) -> BuildResult:
    """`nix build --json --no-link` of a derivation's out output; the log is nix's stderr (`-L` prints build logs),
    written to `log_file` as it comes when one is given (so a progress line can show its last line)."""
    sandbox, settings = sandbox_settings()
    args = ["build", "--json", "--no-link", "-L", output_installable(drv_path)]
    proc = _run_nix(args, f"nix build {drv_path}", timeout, [*settings, *options], hint, log_file)
    (entry,) = json.loads(proc.stdout)
    return BuildResult(drv_path=drv_path, outputs=dict(entry["outputs"]), log=proc.stderr, sandbox=sandbox)


def add_gc_root(out_path: Path, link: Path) -> None:
    """Register `out_path` as a Nix GC root through the symlink `link` (replacing what `link` rooted before).

    `nix-store --realise PATH --add-root LINK --indirect` (Nix 2.8 and later alike): LINK points at the store path and
    Nix's gcroots/auto points at LINK, so `nix-collect-garbage` keeps the path while LINK exists and frees it once
    LINK points elsewhere or is removed.
    """
    link.parent.mkdir(parents=True, exist_ok=True)
    _nix_store(
        ["--realise", str(out_path), "--add-root", str(link), "--indirect"],
        f"nix-store --add-root {link}",
        f"could not register {out_path} as a GC root at {link}.",
    )


def drop_gc_roots(directory: Path, keep: set[str]) -> None:
    """Remove the GC root links in `directory` whose name is not in `keep` (images the domain no longer has)."""
    if directory.is_dir():
        for link in directory.iterdir():
            if link.name not in keep:
                link.unlink(missing_ok=True)


@dataclass(frozen=True)
class RebuildResult:
    """`nix build --rebuild` of one derivation: whether the new output matched the one in the store."""

    drv_path: str
    reproducible: bool
    output: str = ""  # the output path in the store
    differing: str = ""  # with --keep-failed, where Nix left the differing build (`<output>.check`)
    log: str = ""
    build_dir: str = ""  # with --keep-failed, the build directory Nix kept as well (the caller removes it)


_NOT_DETERMINISTIC = re.compile(r"may not be deterministic: output '([^']+)' differs(?: from '([^']+)')?")
_KEPT_BUILD_DIR = re.compile(r"keeping build directory '([^']+)'")


def rebuild(drv_path: str, *, options: Sequence[str] = (), timeout: float = BUILD_TIMEOUT) -> RebuildResult:
    """Build a derivation whose output is already valid once more, and compare (`nix build --rebuild`).

    Nix rebuilds only this derivation, not what it is made from.  A differing output is kept beside the valid one
    as `<output>.check` (`--keep-failed`), so the caller can name the first file that differs.
    """
    args = ["build", "--no-link", "-L", "--rebuild", "--keep-failed", output_installable(drv_path)]
    try:
        proc = _run_nix(args, f"nix build --rebuild {drv_path}", timeout, [*sandbox_settings()[1], *options])
    except NixError as exc:
        match = _NOT_DETERMINISTIC.search(exc.stderr)
        if not match:
            raise
        kept = _KEPT_BUILD_DIR.search(exc.stderr)
        return RebuildResult(
            drv_path, False, match.group(1), match.group(2) or "", exc.stderr, kept.group(1) if kept else ""
        )
    return RebuildResult(drv_path, True, log=proc.stderr)


_DRV_OUTPUT = re.compile(r'\("(\w+)","(/[^"]*)","([^"]*)","([^"]*)"\)')
_DRV_INPUTS = re.compile(r'\("(/[^"]+\.drv)",\[')


def _read_drv(drv_path: str) -> tuple[bool, list[str]]:
    """(fixed-output?, input derivations) of a store derivation, read from its ATerm file (stable across Nix)."""
    text = Path(drv_path).read_text()
    outputs_end = text.find("],[")  # Derive([outputs],[inputDrvs],…
    fixed = any(m.group(3) for m in _DRV_OUTPUT.finditer(text[:outputs_end]))
    return fixed, sorted(set(_DRV_INPUTS.findall(text[outputs_end : text.find("],[", outputs_end + 3)])))


# What an image is assembled from (NixOS's names), checked before the packages it contains.
_SYSTEM_PARTS = re.compile(r"-(nixos-system|initrd|closure-info|squashfs|ext4-fs|efi|boot|etc|system-path|image)")


def built_from(drv_path: str, limit: int = 8) -> list[str]:
    """The derivation and those it is made from that a rebuild can check, nearest first, at most `limit`.

    Fixed-output derivations (fetched sources, the demo's imported Debian inputs) are left out: their content is
    pinned by hash already and their builders fetch rather than build.  For a nixpkgs system the closure has
    thousands of derivations; the nearest `limit` are checked, the system's own parts (toplevel, initrd, closure
    info, squashfs…) before the packages at the same depth.
    """
    queue, seen, found = [drv_path], {drv_path}, list[str]()
    while queue and len(found) < limit:
        current = queue.pop(0)
        fixed, inputs = _read_drv(current)
        if fixed:
            continue
        found.append(current)
        for dep in sorted(inputs, key=lambda d: _SYSTEM_PARTS.search(Path(d).name[32:]) is None):
            if dep not in seen:
                seen.add(dep)
                queue.append(dep)
    return found


def parse_error(path: Path) -> str | None:
    """`nix-instantiate --parse PATH`: None when the file parses, else nix's words about where it does not."""
    try:
        proc = run(["nix-instantiate", "--parse", str(path)], timeout=60)
    except FileNotFoundError:
        raise NixError("nix-instantiate is not installed.", hint="Run scripts/setup.sh and try again.") from None
    except ProcessTimeout as exc:
        raise NixError(f"nix-instantiate --parse {path} did not finish within 60 s.", exc.output) from None
    return None if proc.returncode == 0 else proc.stderr.strip()


def show_config(options: Sequence[str] = ()) -> dict[str, Any]:
    """`nix show-config --json`, flattened to {setting: value}."""
    raw = json.loads(_nix(["show-config", "--json"], "nix show-config", 60, options))
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in raw.items()}


def hydra_product(out_path: Path, product_type: str) -> Path:
    """The file a build output names in nix-support/hydra-build-products (`file <type> <path>`), as Hydra finds it."""
    products = out_path / "nix-support" / "hydra-build-products"
    if not products.is_file():
        raise NixError(f"{out_path} has no nix-support/hydra-build-products, so its image file cannot be found.")
    for line in products.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "file" and parts[1] == product_type:
            return Path(parts[2])
    raise NixError(f"{products} lists no 'file {product_type} …' product.")


# --- How a system gets built: native, local emulation (binfmt), or a remote builder. ---------------------------------


@dataclass(frozen=True)
class BuildPlan:
    strategy: Strategy
    system: System
    reason: str
    options: tuple[str, ...] = ()  # extra nix options, e.g. ("--option", "builders", "…")

    def describe(self) -> str:
        return f"{self.system.value} via {self.strategy.value}: {self.reason}"


@dataclass(frozen=True)
class NixFacts:
    """What the local Nix and kernel can do, read once (see `local_facts`)."""

    system: str
    extra_platforms: tuple[str, ...] = ()
    builders: str = ""  # nix.conf `builders`: a machines list or @file
    binfmt: dict[str, str] = field(default_factory=dict)  # registered binfmt name -> interpreter


def _binfmt_entries(directory: Path = BINFMT_DIR) -> dict[str, str]:
    entries: dict[str, str] = {}
    if not (directory / "register").exists():
        return entries
    for entry in directory.iterdir():
        if entry.name in {"register", "status"}:
            continue
        try:
            text = entry.read_text()
        except OSError:
            continue
        if not text.startswith("enabled"):
            continue
        match = re.search(r"^interpreter (\S+)", text, re.M)
        entries[entry.name] = match.group(1) if match else ""
    return entries


def local_facts() -> NixFacts:
    config = show_config()
    platforms = config.get("extra-platforms", [])
    if isinstance(platforms, str):
        platforms = platforms.split()
    builders = config.get("builders", "")
    return NixFacts(
        system=str(config.get("system", "")),
        extra_platforms=tuple(platforms),
        builders=str(builders or "").strip(),
        binfmt=_binfmt_entries(),
    )


def _machines_systems(builders: str) -> set[str]:
    """Systems that nix.conf `builders` (inline lines or @file) offers."""
    text = builders
    if builders.startswith("@"):
        path = Path(builders[1:])
        text = path.read_text() if path.is_file() else ""
    systems: set[str] = set()
    for line in re.split(r"[;\n]", text):
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            systems.update(parts[1].split(","))
    return systems


def builders_option(builders: Sequence[Builder]) -> str:
    """The domain's remote builders as Nix's `builders` setting (machines lines joined by ';')."""
    return " ; ".join(b.machines_line() for b in builders)


def plan_build(system: System, facts: NixFacts, domain_builders: Sequence[Builder] = ()) -> BuildPlan:
    """How `system` gets built here: native, local emulation, remote builder, in that order; else the fixes."""
    if facts.system == system.value:
        return BuildPlan(Strategy.native, system, f"the local Nix is {facts.system}")
    emulator = next((name for name in facts.binfmt if name == f"qemu-{system.arch}"), None)
    if system.value in facts.extra_platforms and emulator:
        return BuildPlan(
            Strategy.emulation,
            system,
            f"local Nix lists {system.value} in extra-platforms and binfmt runs it with "
            f"{facts.binfmt[emulator] or emulator}",
        )
    ours = [b for b in domain_builders if system in b.systems]
    if ours:
        machines = builders_option(ours)
        return BuildPlan(
            Strategy.remote,
            system,
            "remote builder(s) from domain.json: " + ", ".join(b.uri for b in ours),
            ("--option", "builders", machines, "--option", "builders-use-substitutes", "false"),
        )
    if system.value in _machines_systems(facts.builders):
        return BuildPlan(
            Strategy.remote, system, f"remote builder(s) from Nix's own builders setting ({facts.builders})"
        )
    local = facts.system or "this machine's system"
    why = []
    if system.value not in facts.extra_platforms:
        why.append(f"the local Nix ({local}) does not list {system.value} in system/extra-platforms")
    if not emulator:
        why.append(f"no binfmt_misc interpreter for {system.arch} is registered")
    raise NixError(
        f"a '{system.value}' build is required but this machine is a '{local}' ({'; '.join(why)}), and no remote "
        f"builder offers {system.value}. Two fixes: (1) emulate it locally: install qemu-user-static (Debian/Ubuntu; "
        f'on NixOS boot.binfmt.emulatedSystems = [ "{system.value}" ]), make sure '
        f"{BINFMT_DIR}/qemu-{system.arch} is enabled (`mount -t binfmt_misc binfmt_misc {BINFMT_DIR}` then "
        f"`update-binfmts --enable qemu-{system.arch}`), and add `extra-platforms = {system.value}` to "
        f"/etc/nix/nix.conf — scripts/setup.sh does all of this; or (2) use a remote builder: add one to domain.json "
        f'("builders": [{{"uri": "ssh-ng://nix@builder", "systems": ["{system.value}"], '
        f'"ssh_key": "/root/.ssh/id_builder"}}]) or to Nix\'s own `builders` setting / /etc/nix/machines.'
    )
