"""The image contract: one source (pipeline/contract.json), the copies the domains carry, docs/contract.md's list of
names, the pipeline code that reads it, configs/cim's Nix code, and the demo's Nix plan against the pipeline's."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cimtest.demo import needs_demo

from pipeline import contract
from pipeline.contract import CONTRACT, CONTRACT_FILE, ContractError
from pipeline.diskplan import DiskPlanError, evaluate, plan_from_devices
from pipeline.domain import DiskBus, DomainError, System, parse_domain
from pipeline.install import target_kind
from pipeline.qemu import Drive, VmSpec

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = [ROOT / "configs/demo", ROOT / "configs/cim"]


def templates() -> list[str]:
    """Every string name of the contract, as written there ({host} placeholders included)."""
    return [name for name in contract.leaf_names() if not name.isdigit()]


def fragments() -> list[str]:
    """The distinctive pieces of every string name: templates cut at {host}, pieces under 5 characters left out."""
    return sorted({part.strip() for name in templates() for part in name.split("{host}") if len(part.strip()) >= 5})


# -- one source ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS, ids=lambda d: d.name)
def test_each_domain_carries_the_pipelines_contract(domain: Path) -> None:
    assert (domain / "contract.json").read_bytes() == CONTRACT_FILE.read_bytes()
    contract.check_domain_copy(domain)  # and validate agrees


def test_a_drifted_copy_is_refused_naming_the_key(tmp_path: Path) -> None:
    data = json.loads(CONTRACT_FILE.read_text())
    data["install"]["credential"] = "cim.setup"
    (tmp_path / "contract.json").write_text(json.dumps(data))
    with pytest.raises(ContractError) as err:
        contract.check_domain_copy(tmp_path)
    assert "contract.json: the image contract differs from the pipeline's in install" in str(err.value)
    assert str(CONTRACT_FILE) in err.value.hint


def test_contract_helpers() -> None:
    assert contract.for_host(CONTRACT.boot_complete, "h1") == "cim: h1 boot complete"
    assert re.match(contract.boot_complete_pattern("h1"), "cim: h1 boot complete (x86_64-linux)")
    assert not re.match(contract.boot_complete_pattern("h1"), "cim: h10 boot complete")
    assert contract.install_request() == ["-smbios", "type=11,value=io.systemd.credential:cim.install=1"]
    assert contract.stats_subject("vhost-dev") == "cim.vhost-dev.stats"
    assert contract.inventory_subject("vhost-dev") == "cim.vhost-dev.inventory"
    assert [contract.partition_device(k.device, 3) for k in DiskBus] == ["/dev/vda3", "/dev/nvme0n1p3", "/dev/sda3"]
    assert contract.partition_device("/dev/mmcblk0", 2) == "/dev/mmcblk0p2"


# -- docs/contract.md lists every name; the pipeline spells none of them itself ----------------------------------------


def documented_contract() -> str:
    """docs/contract.md's contract proper: from its title to the next section (the install flow), not the whole page."""
    text = (ROOT / "docs/contract.md").read_text()
    match = re.search(r"^# The image contract\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "docs/contract.md has no '# The image contract' section followed by a '## ' section"
    return match.group(1)


def test_contract_page_lists_every_name_the_pipeline_relies_on() -> None:
    section = documented_contract()
    missing = [name for name in contract.leaf_names() if name.replace("{host}", "<host>") not in section]
    assert missing == []


def string_constants(path: Path) -> list[tuple[int, str | int]]:
    """A module's string and int literals, docstrings left out: what its code uses."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, (str, int))
        and id(node) not in docstrings
        and not isinstance(node.value, bool)
    ]


def test_pipeline_code_takes_every_contract_name_from_the_contract() -> None:
    # Each name the pipeline relies on inside an image is read from pipeline.contract, so the docs check above
    # covers every name the code uses; a literal spelled elsewhere would escape both.
    ports = {CONTRACT.ports.nats}  # 53 and 22 are too common as plain numbers to police
    found = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        if path.name == "contract.py":
            continue
        for line, value in string_constants(path):
            if isinstance(value, int):
                if value in ports:
                    found.append(f"{path.name}:{line}: {value}")
            elif any(fragment in value for fragment in fragments()):
                found.append(f"{path.name}:{line}: {value!r}")
    assert found == []


def test_pipeline_has_no_branch_on_the_demo() -> None:
    # The grep: nothing under pipeline/ knows about isolinux prompts, fw_cfg plans or typing at a console.
    hits = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"fw_cfg|isolinux|type_console\(", line, re.I):
                hits.append(f"{path.name}:{number}: {line.strip()}")
    assert hits == []


# -- configs/cim's Nix code uses the contract's names ----------------------------------------------------------------

CIM_NIX = sorted((ROOT / "configs/cim").rglob("*.nix"))


def contract_keys(value: object = None, prefix: str = "") -> set[str]:
    value = json.loads(CONTRACT_FILE.read_text()) if value is None else value
    keys = set()
    if isinstance(value, dict):
        for key, item in value.items():
            keys.add(prefix + key)
            keys |= contract_keys(item, prefix + key + ".")
    return keys


def nix_code(path: Path) -> str:
    """A .nix file without its comments (a name in a comment or in `<host>` form is documentation, not code)."""
    lines = path.read_text().splitlines()
    return "\n".join(line.split(" # ")[0] for line in lines if not line.lstrip().startswith("#"))


def test_cim_nix_reads_its_names_from_the_contract() -> None:
    used = set()
    for path in CIM_NIX:
        text = nix_code(path)
        if re.search(r"\bcontract\b|\bports\.", text):
            assert "contract.json" in text, f"{path.name} uses contract names but does not read contract.json"
        used |= set(re.findall(r"\bcontract\.((?:[a-z_]+\.)*[a-z_]+)", text))
        used |= {f"ports.{port}" for port in re.findall(r"\bports\.([a-z_]+)", text)}
        used |= {f"install.{field}" for field in re.findall(r'\bline "([a-z_]+)"', text)}
    used.discard("json")
    unknown = sorted(key for key in used if key not in contract_keys())
    assert unknown == [], f"configs/cim reads names the contract does not have: {unknown}"
    # What the cim images must print or read: the boot-complete line, the install request and lines, the report
    # lines the install check reads, the statistics subject, the ports its probes use.
    needed = {
        "boot_complete",
        "install.credential",
        "install.started",
        "install.done",
        "install.failed",
        "report.fs",
        "report.part",
        "report.swap",
        "subjects.stats",
        "ports.nats",
        "ports.dns",
    }
    assert needed - used == set()


def spellings(template: str) -> str:
    """A regex for a contract name written out in code, the host as a Nix or shell interpolation:
    `cim.${hostName}.stats`, `cim: $host boot complete`."""
    return r"(?:\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)".join(re.escape(part) for part in template.split("{host}"))


def test_cim_nix_spells_no_contract_name_itself() -> None:
    # A name written out in the code would not follow the contract when it changes.  (disk-config.nix names its
    # device, as disko needs; test_cim_declares_its_install_disk_as_nvme holds it to the contract.)
    names = [spellings(name) for name in templates() if name not in CONTRACT.disks.values()]
    literal = [
        f"{path.name}: {match.group(0)!r}"
        for path in CIM_NIX
        for name in names
        for match in [re.search(name, nix_code(path))]
        if match
    ]
    ports = [
        f"{path.name}: {port}"
        for path in CIM_NIX
        for port in (CONTRACT.ports.nats,)
        if re.search(rf"\b{port}\b", nix_code(path))
    ]
    assert literal + ports == []


DEMO_CODE = sorted(
    p for part in ("rootfs", "builders", "lib") for p in (ROOT / "configs/demo" / part).rglob("*") if p.is_file()
)


def test_demo_images_take_their_names_from_the_contract() -> None:
    # The demo's init scripts, installer and builders print and read the contract's names through
    # /etc/cim/contract.sh, which lib/host.nix writes from contract.json; none spells one itself.
    names = [spellings(name) for name in templates() if name not in CONTRACT.disks.values()]
    literal = [
        f"{path.relative_to(ROOT)}: {match.group(0)!r}"
        for path in DEMO_CODE
        for name in names
        for match in [re.search(name, nix_code(path))]
        if match
    ]
    assert literal == []
    assert re.search(spellings(CONTRACT.boot_complete), 'echo "cim: $host boot complete"')  # the check bites
    host_nix = (ROOT / "configs/demo/lib/host.nix").read_text()
    assert {
        "boot_complete",
        "install.credential",
        "install.started",
        "install.done",
        "install.failed",
        "report.fs",
        "report.part",
        "report.swap",
    } <= set(re.findall(r"\bcontract\.((?:[a-z_]+\.)*[a-z_]+)", host_nix))


def test_cim_declares_its_install_disk_as_nvme() -> None:
    domain = parse_domain(json.loads((ROOT / "configs/cim/domain.json").read_text()), "domain.json")
    (disk,) = domain.hosts["vhost-dev"].hardware.disks
    assert disk.bus is DiskBus.nvme and disk.device == DiskBus.nvme.device
    assert f'device = "{DiskBus.nvme.device}";' in (ROOT / "configs/cim/disk-config.nix").read_text()


# -- disks as declared ------------------------------------------------------------------------------------------------


def test_disk_kind_must_fit_its_device() -> None:
    data = json.loads((ROOT / "configs/demo/domain.json").read_text())
    data["hosts"]["vhost-dev"]["hardware"]["disks"][0]["kind"] = "nvme"  # device stays /dev/vda
    with pytest.raises(DomainError, match=r"kind 'nvme' attaches as /dev/nvme0n1, but device is '/dev/vda'"):
        parse_domain(data, "domain.json")


def demo_host(device: str, kind: str | None) -> tuple[Path, object]:
    data = json.loads((ROOT / "configs/demo/domain.json").read_text())
    disk = {"name": "main", "device": device, "size_gib": 1} | ({"kind": kind} if kind else {})
    data["hosts"]["vhost-dev"]["hardware"]["disks"] = [disk]
    return ROOT / "configs/demo", parse_domain(data, "domain.json").hosts["vhost-dev"]


def plan_on(device: str) -> object:
    root = {"size": "100%", "content": {"type": "filesystem", "format": "ext4", "mountpoint": "/"}}
    return plan_from_devices(
        {
            "disk": {
                "main": {"type": "disk", "device": device, "content": {"type": "gpt", "partitions": {"root": root}}}
            }
        },
        "main",
        1024,
        "dc.nix",
    )


@pytest.mark.parametrize(("device", "kind"), [("/dev/nvme0n1", "nvme"), ("/dev/vda", None), ("/dev/sda", "sata")])
def test_target_kind_follows_the_declared_disk(device: str, kind: str | None) -> None:
    domain_dir, host = demo_host(device, kind)
    assert target_kind(domain_dir, "vhost-dev", host, plan_on(device)) is DiskBus.for_device(device)  # type: ignore[arg-type]


def test_target_kind_refuses_a_disk_config_elsewhere() -> None:
    domain_dir, host = demo_host("/dev/nvme0n1", "nvme")
    with pytest.raises(
        DiskPlanError,
        match=r"disko.devices.disk.main.device = '/dev/vda', but domain.json "
        r"hosts.vhost-dev.hardware.disks 'main' is '/dev/nvme0n1'",
    ):
        target_kind(domain_dir, "vhost-dev", host, plan_on("/dev/vda"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "devices"),
    [
        (DiskBus.nvme, ["nvme,drive=drive0,serial=t"]),
        (DiskBus.virtio, ["virtio-blk-pci,drive=drive0,serial=t"]),
        (DiskBus.sata, ["ahci,id=ahci0", "ide-hd,drive=drive0,bus=ahci0.0,serial=t"]),
    ],
)
def test_install_disk_is_attached_as_its_kind(tmp_path: Path, kind: DiskBus, devices: list[str]) -> None:
    spec = VmSpec(
        name="d",
        system=System.x86_64_linux,
        workdir=tmp_path,
        console_log=tmp_path / "log",
        drives=(Drive(tmp_path / "disk.qcow2", format="qcow2", serial="t", bus=kind.value),),
    )
    argv = spec.argv()
    assert [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-device"][:-1] == devices


# -- the demo's plan (Nix, in the image) is the pipeline's plan ------------------------------------------------------

NVME_CONFIG = """{ disko.devices.disk.os = { type = "disk"; device = "/dev/nvme0n1"; content = { type = "gpt";
  partitions = {
    root = { size = "100%"; content = { type = "filesystem"; format = "ext4"; mountpoint = "/"; }; };
    boot = { size = "1G"; type = "EF00"; content = { type = "filesystem"; format = "vfat"; mountpoint = "/boot"; }; };
    swap = { size = "1.5G"; content.type = "swap"; };
    bios = { size = "1M"; type = "EF02"; content = { type = "swap"; }; priority = 50; };
  }; }; }; }
"""


@pytest.mark.nix
@needs_demo
@pytest.mark.parametrize(("config", "disk"), [(None, "main"), (NVME_CONFIG, "os")], ids=["demo", "nvme-priorities"])
def test_demo_image_partitions_as_the_pipelines_plan(tmp_path: Path, config: str | None, disk: str) -> None:
    """The layout script the image carries (lib/disklayout.nix) partitions a plain gpt disk exactly as the plan the
    pipeline checks the installed disk against (the same sfdisk script, partition for partition)."""
    shutil.copytree(ROOT / "configs/demo/lib", tmp_path / "lib")
    path = tmp_path / "disk-config.nix"
    if config is None:
        shutil.copy(ROOT / "configs/demo/disk-config.nix", path)
    else:
        path.write_text(config)
    expr = f"(import {tmp_path}/lib/disklayout.nix {{ diskConfig = import {path}; }}).script"
    script = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "eval", "--impure", "--raw", "--expr", expr],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    plan = evaluate(path, disk, 20480)
    sfdisk = script.split("<<'CIM_SFDISK'\n", 1)[1].split("\nCIM_SFDISK", 1)[0] + "\n"
    assert f"target {plan.device}\n" in script
    assert sfdisk == plan.sfdisk_script()


def test_stable_names_are_presented_as_qemu_gives_them(tmp_path: Path) -> None:
    """A SATA disk's model and world wide name, a SCSI disk on virtio-scsi: what udev's by-id names are made from."""
    spec = VmSpec(
        name="d",
        system=System.x86_64_linux,
        workdir=tmp_path,
        console_log=tmp_path / "log",
        drives=(
            Drive(tmp_path / "a.qcow2", format="qcow2", serial="S1", bus="sata", model="Samsung SSD 870"),
            Drive(tmp_path / "b.qcow2", format="qcow2", bus="scsi", wwn="0x5000c500a1b2c3d4"),
            Drive(tmp_path / "c.qcow2", format="qcow2", bus="virtio"),
            Drive(tmp_path / "d.qcow2", format="qcow2", bus="nvme", serial="N1", slot=5),
        ),
    )
    argv = spec.argv()
    devices = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-device"]
    assert "ide-hd,drive=drive0,bus=ahci0.0,serial=S1,model=Samsung SSD 870" in devices
    assert "virtio-scsi-pci,id=scsi0" in devices
    assert "scsi-hd,drive=drive1,bus=scsi0.0,scsi-id=0,wwn=0x5000c500a1b2c3d4" in devices
    # A disk at a fixed PCI slot (by-path) comes before any device QEMU places itself.
    assert devices[0] == "nvme,drive=drive3,serial=N1,addr=0x05"
