"""The image contract: what an image must do to be tested by cim-pipeline, read from `contract.json` beside this file.

Every name the pipeline relies on inside an image lives in that one file: the boot-complete line, how an install is
requested (the systemd credential `cim.install`, handed over as an SMBIOS type 11 string), the installer's console
lines, the installed system's report lines, the NATS subjects, the ports the probes use and the device each disk kind
appears as.  A domain carries a byte-identical copy as `contract.json` beside its `flake.nix` (a `path:` flake cannot
read outside its directory), which its Nix code reads; `check_domain_copy` refuses a copy that drifted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.errors import CimError

CONTRACT_FILE = Path(__file__).with_name("contract.json")
DOMAIN_COPY = "contract.json"  # the copy a domain carries beside its flake.nix


class ContractError(CimError):
    """A domain's copy of the contract differs from the pipeline's."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InstallNames(_Frozen):
    credential: str
    smbios_type: int
    smbios_value: str
    started: str
    done: str
    failed: str


class ReportNames(_Frozen):
    fs: str
    part: str
    swap: str
    layer: str  # the layers under the file systems: md arrays, device-mapper (LUKS, LVM), btrfs subvolumes


class Subjects(_Frozen):
    stats: str
    inventory: str


class Ports(_Frozen):
    nats: int
    dns: int
    ssh: int


class Contract(_Frozen):
    about: str
    boot_complete: str
    install: InstallNames
    report: ReportNames
    subjects: Subjects
    ports: Ports
    disks: dict[str, str]


def _load() -> Contract:
    return Contract.model_validate(json.loads(CONTRACT_FILE.read_text(encoding="utf-8")))


CONTRACT = _load()


def for_host(template: str, host: str) -> str:
    """A contract line with the host's name in it: for_host("cim: {host} boot complete", "h") is "cim: h boot …"."""
    return template.replace("{host}", host)


def line_pattern(template: str, host: str) -> str:
    """A regex matching the contract line at the start of a console line."""
    return "^" + re.escape(for_host(template, host))


def boot_complete_pattern(host: str) -> str:
    """The line every image prints once it has booted."""
    return line_pattern(CONTRACT.boot_complete, host)


def install_request() -> list[str]:
    """QEMU arguments that request an install: the credential as an SMBIOS OEM string (what systemd reads natively)."""
    return ["-smbios", f"type={CONTRACT.install.smbios_type},value={CONTRACT.install.smbios_value}"]


def stats_subject(host: str) -> str:
    return for_host(CONTRACT.subjects.stats, host)


def inventory_subject(host: str) -> str:
    return for_host(CONTRACT.subjects.inventory, host)


def partition_device(disk: str, number: int) -> str:
    """A partition's device: /dev/vda 3 → /dev/vda3, /dev/nvme0n1 3 → /dev/nvme0n1p3 (a name ending in a digit)."""
    return f"{disk}p{number}" if disk[-1:].isdigit() else f"{disk}{number}"


def leaf_names(value: Any = None) -> list[str]:
    """Every name the contract defines (strings and ports), for docs/contract.md and Nix-side checks."""
    if value is None:
        value = CONTRACT.model_dump(exclude={"about"})
    if isinstance(value, dict):
        return [name for item in value.values() for name in leaf_names(item)]
    return [str(value)]


def check_domain_copy(domain_dir: Path) -> None:
    """Refuse a domain whose contract.json differs from the pipeline's (a domain without one is not checked)."""
    copy = domain_dir / DOMAIN_COPY
    if not copy.is_file():
        return
    try:
        theirs = json.loads(copy.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{copy}: not valid JSON ({exc}).", hint=f"Copy {CONTRACT_FILE} over it.") from None
    ours = json.loads(CONTRACT_FILE.read_text(encoding="utf-8"))
    if theirs != ours:
        keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ContractError(
            f"{copy}: the image contract differs from the pipeline's in {', '.join(keys)}; the images this domain "
            "builds would print or read names the pipeline does not look for.",
            hint=f"Copy {CONTRACT_FILE} to {copy} (and rebuild the images).",
        )
