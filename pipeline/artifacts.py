"""Published artifacts: atomic writes, typed per-artifact records, `manifest.json` and `SHA256SUMS`.

Every file under artifacts/ is written to a temporary name in the same directory and renamed into place, so an
interrupted run leaves the previous file or none — never half of one.  What the tasks learn about an artifact is an
`ArtifactRecord` (its image, then its build, boot and install results), kept in `<state>/records/<artifact>.json`;
`Records` is their one writer and one reader, and rebuilds the manifest from them under a lock, since tasks run in
parallel.  `manifest.json` is a `Manifest`; `cim schema manifest` prints its JSON Schema.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.domain import Accel, Sandbox, Strategy
from pipeline.errors import CimError
from pipeline.hashing import remember_xxh3

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
JUNIT = "junit.xml"


class ArtifactError(CimError):
    """An artifact could not be published or does not match its record."""


def write_error(path: Path, exc: OSError) -> ArtifactError:
    """The one message for a file that cannot be written: the path, the system's reason, the fix."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = (
            f"Free space on the file system of {path.parent} (`df -h {path.parent}`), or pass another "
            "directory with `doit artifacts=DIR` / CIM_ARTIFACTS=DIR; then run again."
        )
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = (
            f"Make {path.parent} writable (read-only mount? `lsattr -d` shows an immutable flag), or pass "
            "another directory with `doit artifacts=DIR` / CIM_ARTIFACTS=DIR; then run again."
        )
    else:
        hint = "Fix that path or pass another directory with `doit artifacts=DIR`; then run again."
    return ArtifactError(
        f"cannot write {path}: {reason}. Nothing was replaced: the files already there are unchanged.", hint=hint
    )


_TEMP = re.compile(r"^\..+\.\d+(\.\d+)?\.tmp$")


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_native_id()}.tmp")


class _Writer:
    """The write side of `atomic_file`: a failed write is the ArtifactError naming the file."""

    def __init__(self, out: BinaryIO, dest: Path) -> None:
        self._out = out
        self._dest = dest

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        try:
            while view:  # unbuffered: a short write (the disk filling up) writes the rest, or fails, here
                view = view[self._out.write(view) or 0 :]
        except OSError as exc:
            raise write_error(self._dest, exc) from None
        return len(data)


def _open_temp(dest: Path) -> tuple[int, Path | None]:
    """An unnamed file in dest's directory (O_TMPFILE), else a named temporary one; (fd, its name or None)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(dest.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    named = _temp_name(dest)
    return os.open(named, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644), named


def _link_unnamed(fd: int, name: Path) -> None:
    """Give the O_TMPFILE file `fd` the name `name`: linkat(AT_SYMLINK_FOLLOW) of its /proc/self/fd link.

    Passing a directory fd makes CPython call linkat() with the follow flag (plain link() would link the /proc symlink
    itself and fail with EXDEV).
    """
    parent = os.open(name.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", name.name, dst_dir_fd=parent, follow_symlinks=True)
    finally:
        os.close(parent)


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[_Writer]:
    """A file that appears at `dest` whole, or not at all; the old `dest` stays until the new one is complete.

    It is written unnamed (Linux O_TMPFILE) in `dest`'s directory, so a process killed mid-write (even by SIGKILL)
    leaves nothing behind; only once it is complete and synced does it get a name, and is renamed over `dest`.
    Where the file system has no O_TMPFILE, a named `.<name>.<pid>.<tid>.tmp` is used (`sweep_temps` removes one a
    killed run left).  A write that fails (no space, read-only, no permission) raises ArtifactError naming `dest`;
    errors of the block itself (e.g. reading the source of a copy) pass unchanged.
    """
    try:
        fd, named = _open_temp(dest)
    except OSError as exc:
        raise write_error(dest, exc) from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as out:  # unbuffered: closing after a failed write cannot fail again
            yield _Writer(out, dest)
            try:
                os.fchmod(out.fileno(), 0o644)
                os.fsync(out.fileno())
                if named is None:
                    named = _temp_name(dest)
                    _link_unnamed(out.fileno(), named)
                named.replace(dest)
                named = None
            except OSError as exc:
                raise write_error(dest, exc) from None
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                named.unlink()


def sweep_temps(directory: Path) -> list[Path]:
    """Remove the named temporary files a killed run left in `directory` and its sub-directories; those removed.

    Only call it while holding the artifacts directory's run lock: then no other run is writing there.
    """
    removed = []
    if directory.is_dir():
        for path in [*directory.glob(".*.tmp"), *directory.glob("*/.*.tmp")]:
            if _TEMP.match(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as out:
        out.write(text.encode("utf-8"))


def publish_file(source: Path, dest: Path) -> tuple[str, str, int]:
    """Copy `source` to `dest` atomically, hashing while copying; returns (sha256, xxh3-128, size)."""
    sha, xxh, size = hashlib.sha256(), xxhash.xxh3_128(), 0
    with source.open("rb") as src, atomic_file(dest) as out:
        while chunk := src.read(1 << 20):
            sha.update(chunk)
            xxh.update(chunk)
            out.write(chunk)
            size += len(chunk)
    remember_xxh3(dest, xxh.hexdigest())  # the task's stamp of this output need not read it again
    return sha.hexdigest(), xxh.hexdigest(), size


def publish_log(source: Path, dest: Path) -> None:
    """Keep a VM's console log under artifacts/ (atomically), whatever the outcome."""
    with atomic_file(dest) as out:
        if source.exists():
            with source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            out.write(b"(the VM printed nothing)\n")


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "records.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the records ------------------------------------------------------------------------------------------------------


class Record(BaseModel):
    """Base of every record: fields unknown to this version (an older or newer record) are ignored when read."""

    model_config = ConfigDict(extra="ignore")


Outcome = Literal["pass", "fail"]


def utc_now() -> datetime.datetime:
    """The time now, to the second, in UTC (records and the manifest write it as ISO 8601, `…Z`)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def iso_z(at: datetime.datetime | None) -> str | None:
    """A record's time as its JSON has it (`2026-11-27T17:49:46Z`), for the places that print or dump it."""
    if at is None:
        return None
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class BuildInfo(Record):
    """How the image was built."""

    strategy: Strategy
    reason: str
    seconds: float
    log: str  # relative to the artifacts directory
    at: datetime.datetime | None = None  # when it was published
    sandbox: Sandbox = Sandbox.on  # CIM_SANDBOX: off (or relaxed) images are not hermetic


class ProbeResult(Record):
    """One probe against a booted image."""

    probe: str
    ok: bool
    seconds: float  # the probe's latency: from its start to its answer (or to its deadline)
    detail: str  # what it saw; on failure the message naming the probe, the guest and the forwarded port
    guest: str | None = None  # the guest it talked to (None: the console, or the host itself)
    port: int | None = None  # the port on 127.0.0.1 forwarded to that guest


class NetbootLease(Record):
    """The lease the provisioner gave the netbooted host, as its NIC's firmware took it."""

    mac: str
    address: str | None = None  # None: no lease within the deadline
    server: str | None = None  # the DHCP server / next server
    bootfile: str | None = None  # the iPXE script's URL the lease named
    seconds: float = 0.0  # from the VM's start


class NetbootFetch(Record):
    """One file the netbooted host's firmware fetched from the provisioner."""

    url: str
    size: int | None = None  # the published file's size, when it is one of the image's files
    seconds: float = 0.0  # from the previous fetch's end (the lease, for the first) to this one's


class IntruderCheck(Record):
    """A machine with an undeclared MAC on the same LAN: what it got (nothing, when the LAN keeps it out)."""

    mac: str
    address: str  # the static address it took in the LAN after getting no lease
    lease: bool  # it got a DHCP lease
    answered: dict[str, bool] = Field(default_factory=dict)  # service (dhcp, dns, nats) -> it got an answer
    details: dict[str, str] = Field(default_factory=dict)  # service -> what its firmware said
    refused_logged: bool = False  # the provisioner's console names its MAC as refused
    log: str = ""  # its console log, relative to the artifacts directory
    seconds: float = 0.0


class NetbootFacts(Record):
    """What a netboot test saw on the LAN: the provisioner image, the lease, the fetches and the intruder."""

    provisioner: str  # the provisioner's artifact (its ISO)
    provisioner_xxh3: str
    provisioner_log: str  # its console log, relative to the artifacts directory
    lease: NetbootLease
    fetches: list[NetbootFetch] = Field(default_factory=list)
    os_lease: str | None = None  # the lease line the booted system printed (its own DHCP client)
    provisioner_lines: list[str] = Field(default_factory=list)  # the provisioner's DHCP/HTTP lines for this host
    intruder: IntruderCheck | None = None


class BootResult(Record):
    """A boot test of the image whose xxh3 is `image_xxh3`."""

    result: Outcome
    accel: Accel
    log: str
    image_xxh3: str
    seconds: float = 0.0
    probes: list[ProbeResult] = Field(default_factory=list)
    planned: list[str] | None = None  # every probe's name, in order: those after a failed one did not run
    error: str | None = None
    at: datetime.datetime | None = None  # when it ended
    # What, besides the image, decided this boot (VM, probes): a pass with the same image and fingerprint is reused
    # (its inventory report re-reconciled) without a VM.
    fingerprint: str = ""
    reused: str | None = None  # the kept pass (.cim/results/…) this result was re-published from, without a VM
    netboot: NetbootFacts | None = None  # a netboot test: the LAN's side of it


class InventoryKind(enum.StrEnum):
    missing = "missing"  # declared, not detected
    unexpected = "unexpected"  # detected, not declared
    differs = "differs"  # both, with different values


class InventoryDifference(Record):
    """One fact where the detected hardware is not what domain.json declares (inventory.reconcile makes them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    field: str
    declared: str
    detected: str
    kind: InventoryKind

    def describe(self) -> str:
        return f"{self.field}: declared {self.declared}, detected {self.detected} ({self.kind.value})"


class InventoryUnchecked(Record):
    """A declared fact the boot VM cannot be (e.g. 128 GiB, a passed-through GPU): not compared, never a match."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    field: str
    declared: str
    reason: str

    def describe(self) -> str:
        return f"{self.field}: declared {self.declared}, unchecked: {self.reason}"


class InventoryResult(Record):
    """The hardware report of a boot test, reconciled with the host's declared hardware under the domain's policy."""

    result: Outcome  # fail only under policy "enforce" with a difference
    verdict: Literal["match", "differs"]
    policy: Literal["record", "warn", "enforce"]
    report: str  # the detected report, relative to the artifacts directory
    image_xxh3: str
    summary: str
    log: str  # the boot log, whose end holds the verdict (relative to the artifacts directory)
    seconds: float = 0.0
    error: str | None = None  # the enforce failure, naming each difference
    at: datetime.datetime | None = None  # when it was reconciled
    differences: list[InventoryDifference] = Field(default_factory=list)
    unchecked: list[InventoryUnchecked] = Field(default_factory=list)


class NetInstallFacts(Record):
    """An install from the LAN (a netboot host): what the machine got and sent before and while it installed."""

    mac: str
    initrd_bytes: int  # the netboot initrd's size: a stage 1, not the system
    lease: NetbootLease | None = None
    fetches: list[NetbootFetch] = Field(default_factory=list)  # firmware's, then stage 1's (the system)
    system_bytes: int | None = None  # what the system took over the LAN
    system_seconds: float | None = None
    hardware_check: list[str] = Field(default_factory=list)  # the machine's own check, before it wrote the disk
    disk_untouched: bool | None = None  # after a failed install: nothing was written to the disk
    report: str | None = None  # the hardware report it published (kept beside the install log)
    probes: list[ProbeResult] = Field(default_factory=list)  # the installed system's, through its management NIC
    provisioner_log: str | None = None


class InstallResult(Record):
    """An install verification from the ISO (or the netboot image) whose xxh3 is `image_xxh3`."""

    result: Outcome
    log: str
    image_xxh3: str
    disk_mib: int
    plan: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = Field(default_factory=dict)
    checks: list[str] = Field(default_factory=list)
    error: str | None = None
    at: datetime.datetime | None = None  # when it ended
    reused: str | None = None  # the kept pass (.cim/results/…) this result was re-published from, without a VM
    network: NetInstallFacts | None = None  # an install from the LAN


class Generation(Record):
    """A system generation on an installed machine: its number (the boot entry's) and its store path."""

    number: int
    system: str


class DeployResult(Record):
    """deploy:<host>: the installed disk (from the image whose xxh3 is `image_xxh3`) booted, its next generation
    copied over SSH and booted; `rolled_back_to` is set when the boot loader fell back by itself (a failure)."""

    result: Outcome
    log: str
    image_xxh3: str
    variant: str  # "next" (the default run's) or "broken" (asked for: its boot never completes)
    account: str  # who logged in over SSH
    before: Generation | None = None  # what the installed disk booted
    target: Generation | None = None  # the generation deployed (its number as switch-to-configuration gave it)
    after: Generation | None = None  # what the machine runs once the deploy is over
    paths_copied: int = 0
    bytes_copied: int = 0  # the tar stream's bytes over SSH
    failed_boots: int = 0  # boots of the new generation that never completed
    rolled_back_to: int | None = None
    phases: dict[str, float] = Field(default_factory=dict)
    probes: list[ProbeResult] = Field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    at: datetime.datetime | None = None
    reused: str | None = None


class ReproducibilityCheck(Record):
    """`check:<artifact>`: the image's derivation and those it is made from, rebuilt and compared."""

    reproducible: bool
    sha256: str  # the image digest the check confirmed (or failed to)
    derivations: list[str] = Field(default_factory=list)  # rebuilt, nearest first
    seconds: float = 0.0
    derivation: str | None = None  # the first one that gave other bytes
    differs: str | None = None  # its first differing file, in words


class ImagePart(Record):
    """One more file of an image made of several (netboot: the kernel and the initrd beside the iPXE script)."""

    file: str  # relative to the artifacts directory
    size: int
    sha256: str
    xxh3: str


class ArtifactRecord(Record):
    """One image and what was learned about it; its boot and install results belong to its bytes (`xxh3`).

    An image of several files (netboot) names its entry file in `file` (the iPXE script, with its size and sha256)
    and the others in `parts`; its `xxh3` is then the digest of all of them together."""

    host: str
    format: str
    system: str
    drvPath: str
    outPath: str
    file: str  # relative to the artifacts directory
    size: int
    sha256: str
    xxh3: str
    build: BuildInfo
    boot: BootResult | None = None
    inventory: InventoryResult | None = None
    install: InstallResult | None = None
    deploy: DeployResult | None = None  # the installed machine's next generation (deploy:<host>)
    reproducible: bool | None = None  # set by check:<artifact>; details in `check`
    check: ReproducibilityCheck | None = None
    parts: list[ImagePart] | None = None


class Manifest(Record):
    """artifacts/manifest.json."""

    domain: str
    fqdn: str
    domain_dir: str
    generated: datetime.datetime
    artifacts: dict[str, ArtifactRecord]


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.json."""
    return Manifest.model_json_schema()


def _dump(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"


class Records:
    """What the tasks learned about each artifact, and the manifest built from it: the one writer and reader."""

    def __init__(self, state_dir: Path, artifacts_dir: Path, domain_meta: dict[str, str]) -> None:
        self.dir = state_dir / "records"
        self.state_dir = state_dir
        self.artifacts_dir = artifacts_dir
        self.domain_meta = domain_meta

    def load(self, artifact: str) -> ArtifactRecord | None:
        """The artifact's record, or None when it has none (or an unreadable one: the tasks make it again)."""
        try:
            return ArtifactRecord.model_validate_json((self.dir / f"{artifact}.json").read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def all(self) -> dict[str, ArtifactRecord]:
        if not self.dir.is_dir():
            return {}
        records = {p.stem: self.load(p.stem) for p in sorted(self.dir.glob("*.json"))}
        return {name: record for name, record in records.items() if record is not None}

    def save_build(self, artifact: str, record: ArtifactRecord) -> None:
        """A newly published image; the old boot and install results stay only if the bytes are the same."""
        with _locked(self.state_dir):
            old = self.load(artifact)
            if old is not None and old.xxh3 == record.xxh3:
                record = record.model_copy(
                    update={
                        "boot": old.boot,
                        "inventory": old.inventory,
                        "install": old.install,
                        "deploy": old.deploy,
                        "reproducible": old.reproducible,
                        "check": old.check,
                    }
                )
            self._write(artifact, record)

    def save_boot(self, artifact: str, result: BootResult) -> None:
        self._save_result(artifact, boot=result)

    def save_inventory(self, artifact: str, result: InventoryResult) -> None:
        self._save_result(artifact, inventory=result)

    def save_install(self, artifact: str, result: InstallResult) -> None:
        self._save_result(artifact, install=result)

    def save_deploy(self, artifact: str, result: DeployResult) -> None:
        self._save_result(artifact, deploy=result)

    def save_check(self, artifact: str, result: ReproducibilityCheck) -> None:
        with _locked(self.state_dir):
            record = self.load(artifact)
            if record is None:
                raise ArtifactError(
                    f"{artifact} has no build record in {self.dir}, so its check cannot be kept.",
                    hint="Run `doit` again: the build re-publishes the image and its record.",
                )
            self._write(artifact, record.model_copy(update={"reproducible": result.reproducible, "check": result}))

    def _save_result(self, artifact: str, **results: Record) -> None:
        with _locked(self.state_dir):
            record = self.load(artifact)
            if record is None:
                raise ArtifactError(
                    f"{artifact} has no build record in {self.dir}, so its results cannot be kept.",
                    hint="Run `doit` again: the build re-publishes the image and its record.",
                )
            self._write(artifact, record.model_copy(update=results))

    def _write(self, artifact: str, record: ArtifactRecord) -> None:
        atomic_write_text(self.dir / f"{artifact}.json", _dump(record))
        self._write_manifest()

    def drop(self, keep: set[str]) -> None:
        """Forget records of artifacts the domain no longer has."""
        with _locked(self.state_dir):
            dropped = [p for p in (self.dir.glob("*.json") if self.dir.is_dir() else []) if p.stem not in keep]
            for path in dropped:
                path.unlink()
            if dropped:  # else the manifest is as it was: leave it (and its stamp) alone
                self._write_manifest()

    def digest_source(self) -> str:
        """Every record as one text: what the release's up-to-date check compares."""
        return json.dumps({name: r.model_dump(mode="json") for name, r in self.all().items()}, sort_keys=True)

    def _write_manifest(self) -> Manifest:
        records = self.all()
        manifest = Manifest(**self.domain_meta, generated=utc_now(), artifacts=records)
        atomic_write_text(self.artifacts_dir / MANIFEST, _dump(manifest))
        atomic_write_text(self.artifacts_dir / JUNIT, junit_xml(records, self.artifacts_dir, manifest.generated))
        lines = [f"{record.sha256}  {record.file}\n" for record in records.values()]
        lines += [f"{part.sha256}  {part.file}\n" for record in records.values() for part in record.parts or ()]
        atomic_write_text(self.artifacts_dir / SUMS, "".join(sorted(lines, key=lambda ln: ln.split()[1])))
        return manifest

    def rebuild(self) -> Manifest:
        """Write manifest.json and SHA256SUMS from the records now; the manifest written."""
        with _locked(self.state_dir):
            return self._write_manifest()

    def read_manifest(self) -> Manifest | None:
        """The published manifest.json, or None when there is none (or it is unreadable)."""
        try:
            return Manifest.model_validate_json((self.artifacts_dir / MANIFEST).read_bytes())
        except (FileNotFoundError, ValidationError):
            return None


# -- junit.xml: the results as CI systems read them --------------------------------------------------------------------

TAIL_LINES = 30  # console lines a failure carries
# What XML 1.0 cannot carry (and escape sequences, which a console is full of).
_NOT_XML = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[^\x09\x0a\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def console_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a console log, fit for XML; empty when there is no log."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(_xml_text(text).splitlines()[-lines:])


class _Checked(Protocol):
    """A stage's result as junit.xml reports it (install, and inventory once its records carry one)."""

    result: Outcome
    seconds: float
    log: str
    error: str | None


def _case(suite: ET.Element, classname: str, name: str, seconds: float) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=classname, name=name, time=f"{seconds:.3f}")


def _fail(case: ET.Element, message: str, log: Path) -> None:
    failure = ET.SubElement(case, "failure", message=_xml_text(message))
    tail = console_tail(log)
    failure.text = _xml_text(message) + (f"\n\nlast console lines ({log.name}):\n{tail}" if tail else "")


def _boot_cases(suite: ET.Element, artifact: str, boot: BootResult, artifacts_dir: Path) -> None:
    classname = f"{artifact}.boot"
    planned = boot.planned or [p.probe for p in boot.probes]
    for index, name in enumerate(planned):
        if index < len(boot.probes):
            ran = boot.probes[index]
            case = _case(suite, classname, name, ran.seconds)
            if not ran.ok:  # a probe that ran and failed (the others still ran: each reports its own result)
                _fail(case, ran.detail, artifacts_dir / boot.log)
        elif index == len(boot.probes) and boot.result == "fail":
            rest = boot.seconds - sum(p.seconds for p in boot.probes)
            _fail(_case(suite, classname, name, max(0.0, rest)), boot.error or "failed", artifacts_dir / boot.log)
        else:
            skipped = ET.SubElement(_case(suite, classname, name, 0.0), "skipped")
            skipped.set("message", "not run: an earlier probe failed")
    if boot.result == "fail" and len(boot.probes) >= len(planned) and all(p.ok for p in boot.probes):
        # failed after its probes (or with none planned)
        _fail(_case(suite, classname, "boot", boot.seconds), boot.error or "failed", artifacts_dir / boot.log)


def _check_case(suite: ET.Element, artifact: str, stage: str, checked: _Checked, artifacts_dir: Path) -> None:
    case = _case(suite, f"{artifact}.{stage}", stage, checked.seconds)
    if checked.result != "pass":
        _fail(case, checked.error or "failed", artifacts_dir / checked.log)


def junit_xml(records: dict[str, ArtifactRecord], artifacts_dir: Path, timestamp: datetime.datetime) -> str:
    """The results as JUnit XML, in the shape pytest writes: a testsuite per artifact; a testcase per boot probe,
    for the install check and for the inventory check; a failure carries its message and the console's last lines.
    A probe after a failed one is `skipped` (it did not run)."""
    root = ET.Element("testsuites", name="cim-pipeline")
    hostname = socket.gethostname()
    for artifact, record in sorted(records.items()):
        suite = ET.SubElement(root, "testsuite", name=artifact)
        if record.boot is not None:
            _boot_cases(suite, artifact, record.boot, artifacts_dir)
        for stage in ("install", "inventory", "deploy"):
            checked: _Checked | None = getattr(record, stage, None)
            if checked is not None:
                _check_case(suite, artifact, stage, checked, artifacts_dir)
        cases = suite.findall("testcase")
        counts = {kind: sum(1 for c in cases if c.find(kind) is not None) for kind in ("failure", "skipped")}
        suite.attrib.update(
            errors="0",
            failures=str(counts["failure"]),
            skipped=str(counts["skipped"]),
            tests=str(len(cases)),
            time=f"{sum(float(c.get('time', 0)) for c in cases):.3f}",
            timestamp=timestamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            hostname=hostname,
        )
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
