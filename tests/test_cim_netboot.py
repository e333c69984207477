"""configs/cim's network boot and network install, checked without NixOS (no nixpkgs here): its domain.json validates
with a provisioner and a netboot host that is installed from the LAN, its flake builds `system.build.netboot` as
nixpkgs' netboot Hydra job lays it out (for that host: the network installer, on nixpkgs' netboot-minimal.nix), and
the provisioner's DHCP/DNS/TFTP settings, the MAC filter, the binary cache and the installer's settings are generated
from domain.json, not written out.

The generated settings are read by evaluating provisioner.nix, lan.nix and netinstall.nix with `nix-instantiate
--eval` against a small stand-in for nixpkgs' `lib` (only the functions those files call), on a copy of configs/cim
whose domain.json is then changed: what domain.json says must show up, and nothing else. The installer's own steps
(netinstall.sh, hwcheck.jq, facter-macs.jq) run here with stand-ins for the tools that would touch a machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline import install, inventory, netboot, probes
from pipeline.contract import CONTRACT, for_host
from pipeline.diskplan import plan_from_devices
from pipeline.domain import Format, GuestKind, Hardware, load_domain

ROOT = Path(__file__).resolve().parents[1]
CIM = ROOT / "configs" / "cim"
NIX_FILES = sorted(CIM.rglob("*.nix"))


def nix_instantiate() -> str:
    found = shutil.which("nix-instantiate")
    if found is None:
        pytest.skip("nix-instantiate is not installed")
    return found


def code(path: Path) -> str:
    """A .nix file without its comments."""
    lines = path.read_text().splitlines()
    return "\n".join(line.split(" # ")[0] for line in lines if not line.lstrip().startswith("#"))


# -- domain.json ----------------------------------------------------------------------------------------------------


def test_cim_domain_has_a_provisioner_and_a_netboot_host() -> None:
    domain = load_domain(CIM)
    assert domain.provisioner == "vhost-dev"
    prov = domain.hosts["vhost-dev"]
    assert Format.iso in prov.images and prov.lan_mac is not None
    guest = prov.provisioner_guest
    assert guest is not None and guest.kind is GuestKind.provisioner
    assert str(guest.address).rsplit(".", 1)[0] == str(prov.address).rsplit(".", 1)[0]  # in the host's LAN
    assert domain.netboot_hosts() == ["vhost-2"]
    two = domain.hosts["vhost-2"]
    assert two.system.value == "x86_64-linux" and two.role == "hypervisor" and two.lan_mac is not None
    assert [g.kind for g in two.guests] == [GuestKind.nats]
    # Every host is on the LAN under a MAC of its own (the model refuses duplicates and multicast ones).
    assert all(host.lan_mac for host in domain.hosts.values())


def test_cim_netboot_host_is_installed_from_the_lan() -> None:
    # vhost-2 has an install section and the disk it names: `install:vhost-2` installs it from the LAN.
    domain = load_domain(CIM)
    two = domain.hosts["vhost-2"]
    assert two.install is not None and two.install.disk_config == "disk-config.nix"
    assert "vhost-2" in install.installable_hosts(domain)
    assert install.install_format(two) is Format.netboot
    (disk,) = [d for d in two.hardware.disks if d.name == two.install.disk]
    assert disk.device == CONTRACT.disks["nvme"] and disk.size_gib >= (two.install.size_gib or 0)


def test_cim_disk_config_fits_the_netboot_host() -> None:
    # The plan the pipeline makes from disk-config.nix (here evaluated with nix-instantiate, no nixpkgs needed) fits
    # vhost-2's install disk and names the device the host declares.
    exe = nix_instantiate()
    two = load_domain(CIM).hosts["vhost-2"]
    assert two.install is not None
    proc = subprocess.run(
        [exe, "--eval", "--strict", "--json", str(CIM / two.install.disk_config), "-A", "disko.devices"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    plan = plan_from_devices(json.loads(proc.stdout), two.install.disk, install.disk_mib(two), "disk-config.nix")
    assert plan.device == two.hardware.disks[0].device
    assert {p.mountpoint for p in plan.partitions} >= {"/", "/boot"}


# -- the image -------------------------------------------------------------------------------------------------------


def test_cim_flake_builds_netboot_as_the_hydra_job_lays_it_out() -> None:
    flake = code(CIM / "flake.nix")
    assert "nixos/modules/installer/netboot/netboot.nix" in flake
    assert "system.build.netboot" in flake and "(imageOf (netbootModule host)).netboot" in flake
    for name in ("build.kernel", "build.netbootRamdisk", "build.netbootIpxeScript"):
        assert name in flake, name
    assert "nix-support/hydra-build-products" in flake
    # The subtypes the pipeline reads (Format.netboot.product_types), each naming a file of the image itself.
    for subtype in Format.netboot.product_types:
        assert re.search(rf'echo "file {subtype} \$out/', flake), subtype
    # The provisioner serves what the netboot hosts' own configurations build.
    assert "self.nixosConfigurations.${hostName}.config.system.build.netboot" in flake


def test_cim_flake_builds_the_installer_on_netboot_minimal() -> None:
    flake = code(CIM / "flake.nix")
    # A netboot host with `install` boots nixpkgs' netboot-minimal.nix plus netinstall.nix, an evaluation of its own
    # (nothing of the host's system in it) laid out as the same Hydra job; its host's own netboot system rides along
    # under system/ (with the kernel command line the installer's kexec needs), for the provisioner to serve.
    assert re.search(r"if host \? install then\s+installerNetboot hostName host config", flake)
    assert '"${nixpkgs}/nixos/modules/installer/netboot/netboot-minimal.nix"' in flake
    assert "./netinstall.nix" in flake and "ln -s ${ram} $out/system" in flake
    assert "> $out/cmdline" in flake and "init=${config.system.build.toplevel}/init" in flake
    # Run from RAM, an installed host mounts and swaps on nothing of its disk.
    assert "lib.optionalAttrs (host ? install) { disko.enableConfig = false; }" in flake
    # Every host's installed system, for the provisioner's binary cache; the cache's port, shared by both ends.
    assert "systemOf = hostName: self.nixosConfigurations.${hostName}.config.system.build.toplevel;" in flake
    assert re.search(r"cachePort = \d+;", flake)
    # The installer names the system by its store path alone: the system comes from the cache, not in the initrd.
    installer = code(CIM / "netinstall.nix")
    assert 'CIM_SYSTEM = builtins.unsafeDiscardStringContext "${installed.system.build.toplevel}";' in installer
    assert "installed.system.build.formatMount" in installer and "disko-destroy" not in installer


def test_cim_nix_files_parse() -> None:
    exe = nix_instantiate()
    for path in NIX_FILES:
        proc = subprocess.run([exe, "--parse", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{path.relative_to(ROOT)}: {proc.stderr}"


def test_cim_lan_nix_spells_out_no_mac_or_address() -> None:
    # Generated from domain.json: the LAN's Nix code writes out no declared MAC and no host or guest address.
    domain = load_domain(CIM)
    literals = {nic.mac for host in domain.hosts.values() for nic in host.hardware.nics}
    literals |= {str(address) for address in domain.records().values()}
    names = ("lan.nix", "provisioner.nix", "guests.nix", "flake.nix", "netinstall.nix", "netinstall.sh")
    lan_code = [CIM / name for name in names]
    found = [f"{path.name}: {text}" for path in lan_code for text in sorted(literals) if text in path.read_text()]
    assert found == []


# -- what the provisioner says, evaluated -----------------------------------------------------------------------------

# Just what provisioner.nix, lan.nix and netinstall.nix call, with nixpkgs' meaning; mkIf and mkMerge stay visible as
# values. The installer is evaluated for the domain's first netboot host with an install section, `installed` standing
# for that host's configuration: the disko devices of its real disk-config.nix, and its built scripts and system.
STUB = r"""
let
  b = builtins;
  mapAttrsToList = f: a: map (n: f n a.${n}) (b.attrNames a);
  lib = {
    inherit (b) attrNames attrValues concatMap concatStringsSep elem filter head length stringLength;
    inherit mapAttrsToList;
    removeSuffix = suffix: s:
      let n = b.stringLength suffix; l = b.stringLength s; in
      if l >= n && b.substring (l - n) n s == suffix then b.substring 0 (l - n) s else s;
    take = n: l: b.genList (b.elemAt l) (if n < b.length l then n else b.length l);
    splitString = sep: s: b.filter b.isString (b.split (b.replaceStrings [ "." ] [ "\\." ] sep) s);
    toLower = s: b.replaceStrings [ "A" "B" "C" "D" "E" "F" ] [ "a" "b" "c" "d" "e" "f" ] s;
    importJSON = p: b.fromJSON (b.readFile p);
    filterAttrs = p: a:
      b.listToAttrs (b.concatMap (n: if p n a.${n} then [ { name = n; value = a.${n}; } ] else [ ]) (b.attrNames a));
    findFirst = p: d: l: let f = b.filter p l; in if f == [ ] then d else b.head f;
    unique = b.foldl' (acc: e: if b.elem e acc then acc else acc ++ [ e ]) [ ];
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOption = attrs: attrs;
    types.str = "str";
  };
  pkgs = {
    linkFarm = name: entries: { inherit name entries; };
    ipxe = "/nix/store/ipxe";
    writeShellScript = name: text: "/nix/store/${name}";
    writeText = name: text: text;
    iproute2 = "iproute2"; nftables = "nftables"; coreutils = "coreutils"; gnugrep = "gnugrep"; jq = "jq";
    systemd = "systemd"; gawk = "gawk"; bash = "/nix/store/bash"; nixos-enter = "nixos-enter";
    nixos-facter = "nixos-facter"; natscli = "natscli"; curl = "curl"; kexec-tools = "kexec-tools";
    util-linux = "util-linux"; diffutils = "diffutils"; gnused = "gnused";
  };
  dir = /. + DIR;
  domain = b.fromJSON (b.readFile (dir + "/domain.json"));
  host = domain.hosts.${domain.provisioner};
  guest = b.head (b.filter (g: g.kind == "provisioner") host.guests);
  records = b.listToAttrs (b.concatLists (mapAttrsToList (name: h:
    [ { name = "${name}.${domain.fqdn}"; value = h.address; } ]
    ++ map (g: { name = "${g.name}.${name}.${domain.fqdn}"; value = g.address; }) (h.guests or [ ])) domain.hosts));
  provisioner = import (dir + "/provisioner.nix") {
    inherit domain guest records;
    netbootOf = name: "/nix/store/netboot-${name}";
    systemOf = name: "/nix/store/nixos-system-${name}";
    cachePort = 5000;
  } { inherit lib pkgs; config.nix.package = "/nix/store/nix"; };
  installHost = b.head (b.filter (name: domain.hosts.${name} ? install && b.elem "netboot" domain.hosts.${name}.images)
    (b.attrNames domain.hosts));
  netinstall = import (dir + "/netinstall.nix") {
    inherit lib pkgs domain;
    hostName = installHost;
    cachePort = 5000;
    config = {
      system.build.nixos-install = "/nix/store/nixos-install";
      system.boot.loader.kernelFile = "bzImage";
      nix.package = "/nix/store/nix";
    };
    installed = import (dir + "/${domain.hosts.${installHost}.install.disk_config}") // {
      system.build.formatMount = "/nix/store/disko-format-mount-${installHost}";
      system.build.toplevel = "/nix/store/nixos-system-${installHost}";
    };
  };
  lan = import (dir + "/lan.nix") {
    inherit lib pkgs domain;
    hostName = domain.provisioner;
    config.cim.lanBridge = "lan0";
    utils.escapeSystemdPath = s: s;
  };
in
{
  dnsmasq = provisioner.services.dnsmasq.settings;
  filter = (b.head lan.config.contents).content.networking.nftables.tables.cim-lan;
  links = (b.head lan.config.contents).content.systemd.network.links;
  hook = (b.head lan.config.contents).content.systemd.services.cim-lan-uplink.serviceConfig.ExecReload;
  cache = {
    inherit (provisioner.services) harmonia;
    inherit (provisioner.system) extraDependencies;
    key = provisioner.systemd.services.cim-cache-key;
    inherit (provisioner.services.nginx.virtualHosts.netboot) locations;
    tcp = provisioner.networking.firewall.allowedTCPPorts;
  };
  installer = {
    host = installHost;
    service = netinstall.systemd.services.cim-netinstall;
    inherit (netinstall) networking system boot;
  };
}
"""


def evaluate(directory: Path, attribute: str) -> Any:
    exe = nix_instantiate()
    expr = STUB.replace("DIR", json.dumps(str(directory)))  # a JSON string is a Nix string here
    proc = subprocess.run(
        [exe, "--eval", "--strict", "--json", "--readonly-mode", "--expr", expr, "-A", attribute],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def cim_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "cim"
    shutil.copytree(CIM, dest)
    return dest


def test_dnsmasq_serves_what_domain_json_declares(cim_copy: Path) -> None:
    domain = load_domain(cim_copy)
    settings = evaluate(cim_copy, "dnsmasq")
    hosts = {line.split(",set:")[1].split(",")[0]: line for line in settings["dhcp-host"]}
    assert set(hosts) == set(domain.hosts)
    for name, host in domain.hosts.items():
        assert hosts[name] == ",".join([*(n.mac for n in host.hardware.nics), f"set:{name}", str(host.address), name])
    assert settings["dhcp-ignore"] == "tag:!known" and settings["dhcp-range"] == "192.168.23.0,static,255.255.255.0,1h"
    assert "option:router" in settings["dhcp-option"]  # sent empty: no default route on the LAN
    assert "set:ipxe,175" in settings["dhcp-match"]
    assert "tag:vhost-2,tag:ipxe,http://192.168.23.2/vhost-2/netboot.ipxe" in settings["dhcp-boot"]
    assert settings["enable-tftp"] is True and settings["log-dhcp"] is True and settings["tftp-root"] == "/srv/netboot"
    assert settings["local"] == "/cim.local/" and settings["no-resolv"] is True
    assert sorted(settings["host-record"]) == sorted(f"{n},{a}" for n, a in domain.records().items())


def test_a_mac_declared_in_domain_json_reaches_dhcp_and_the_filter(cim_copy: Path) -> None:
    data = json.loads((cim_copy / "domain.json").read_text())
    data["hosts"]["vhost-3"] = {
        **data["hosts"]["vhost-2"],
        "address": "192.168.23.13",
        "hardware": {**data["hosts"]["vhost-2"]["hardware"], "nics": [{"name": "lan", "mac": "02:00:00:23:00:13"}]},
        "guests": [{"name": "nats", "kind": "nats", "address": "10.23.3.10"}],
    }
    (cim_copy / "domain.json").write_text(json.dumps(data))
    load_domain(cim_copy)  # still a valid domain
    settings = evaluate(cim_copy, "dnsmasq")
    assert "02:00:00:23:00:13,set:vhost-3,192.168.23.13,vhost-3" in settings["dhcp-host"]
    assert "tag:vhost-3,tag:ipxe,http://192.168.23.2/vhost-3/netboot.ipxe" in settings["dhcp-boot"]
    table = evaluate(cim_copy, "filter")
    assert table["family"] == "netdev"
    elements = re.search(r"elements = \{ ([^}]*) \}", table["content"])
    assert elements is not None
    assert set(elements.group(1).split(", ")) == {
        nic["mac"] for host in data["hosts"].values() for nic in host["hardware"].get("nics", [])
    }


def test_the_mac_filter_drops_and_logs_undeclared_macs_on_the_lan_nic(cim_copy: Path) -> None:
    table = evaluate(cim_copy, "filter")["content"]
    assert "ether saddr @declared accept" in table
    assert re.search(r'limit rate \d+/second .*log prefix "cim-lan: refused "', table)
    assert re.search(r"\bdrop\b", table)
    # Hooked on the ingress of the NIC that carries the provisioner's declared MAC, renamed after its domain.json NIC.
    hook = evaluate(cim_copy, "hook")
    assert 'type filter hook ingress device "lan"' in hook and "jump refuse" in hook
    provisioner = load_domain(cim_copy).hosts["vhost-dev"]
    assert evaluate(cim_copy, "links") == {
        "10-cim-lan": {"matchConfig": {"PermanentMACAddress": provisioner.lan_mac}, "linkConfig": {"Name": "lan"}}
    }


# -- the binary cache -------------------------------------------------------------------------------------------------


def test_provisioner_serves_the_installed_systems_from_a_binary_cache(cim_copy: Path) -> None:
    cache = evaluate(cim_copy, "cache")
    # nixpkgs' harmonia, on the port the installer is given, open on the guest's firewall.
    assert cache["harmonia"]["enable"] is True
    port = int(cache["harmonia"]["settings"]["bind"].rsplit(":", 1)[1])
    assert port in cache["tcp"]
    assert evaluate(cim_copy, "installer")["service"]["environment"]["CIM_CACHE"].endswith(f":{port}")
    # The systems it serves are in the provisioner's closure: every netboot host with install, none other.
    assert cache["extraDependencies"] == ["/nix/store/nixos-system-vhost-2"]
    data = json.loads((cim_copy / "domain.json").read_text())
    data["hosts"]["vhost-3"] = {
        **{k: v for k, v in data["hosts"]["vhost-2"].items() if k != "install"},
        "address": "192.168.23.13",
        "hardware": {
            **{k: v for k, v in data["hosts"]["vhost-2"]["hardware"].items() if k != "disks"},
            "nics": [{"name": "lan", "mac": "02:00:00:23:00:13"}],
        },
        "guests": [{"name": "nats", "kind": "nats", "address": "10.23.3.10"}],
    }
    (cim_copy / "domain.json").write_text(json.dumps(data))
    load_domain(cim_copy)  # still a valid domain: a netboot host that runs from RAM, never installed
    assert evaluate(cim_copy, "cache")["extraDependencies"] == ["/nix/store/nixos-system-vhost-2"]


def test_the_cache_key_is_made_on_the_provisioner_not_kept_in_the_repository(cim_copy: Path) -> None:
    cache = evaluate(cim_copy, "cache")
    (secret,) = cache["harmonia"]["signKeyPaths"]
    assert secret.startswith("/var/lib/") and cache["key"]["serviceConfig"]["StateDirectory"] == "cim-cache"
    # Made once (only when missing), before harmonia, which needs it; the secret half readable by root only.
    key = cache["key"]
    assert "harmonia.service" in key["before"] and key["requiredBy"] == ["harmonia.service"]
    assert key["serviceConfig"]["UMask"] == "0077"
    assert re.search(r"if \[ ! -s \S*key\.sec \]; then\s+nix key generate-secret", key["script"])
    # The public half is served over HTTP for the installers.
    assert cache["locations"]["= /cache-key.pub"]["alias"] == secret.replace("key.sec", "key.pub")
    # No secret key anywhere in configs/cim: a Nix secret key is a name and 64 bytes of base64.
    secret_key = re.compile(r"[\w.-]+-\d+:[A-Za-z0-9+/]{86}==")
    assert [p.name for p in CIM.rglob("*") if p.is_file() and secret_key.search(p.read_text(errors="ignore"))] == []


# -- the installer's settings -----------------------------------------------------------------------------------------


def test_installer_settings_come_from_domain_json_and_disk_config(cim_copy: Path) -> None:
    domain = load_domain(cim_copy)
    installer = evaluate(cim_copy, "installer")
    host = domain.hosts[installer["host"]]
    env = installer["service"]["environment"]
    assert installer["host"] == "vhost-2" and installer["networking"]["hostName"] == "vhost-2"
    # The install disk: disk-config.nix's device for the disk install.disk names, the one domain.json declares.
    assert host.install is not None
    (declared_disk,) = [d for d in host.hardware.disks if d.name == host.install.disk]
    assert env["CIM_DISK"] == declared_disk.device
    assert env["CIM_DISKO"].endswith("/bin/disko-format-mount")
    assert env["CIM_SYSTEM"] == "/nix/store/nixos-system-vhost-2"
    # The provisioner's LAN services: its pxe guest's cache, key and system; its host's nats guest, through the port
    # forward its host keeps on its LAN address.
    assert domain.provisioner is not None
    prov = domain.hosts[domain.provisioner]
    pxe = prov.provisioner_guest
    assert pxe is not None
    assert env["CIM_CACHE"] == f"http://{pxe.address}:5000"
    assert env["CIM_CACHE_KEY_URL"] == f"http://{pxe.address}/cache-key.pub" and env["CIM_CACHE_KEY"] == ""
    assert env["CIM_SYSTEM_URL"] == f"http://{pxe.address}/vhost-2/system"
    assert any(g.kind is GuestKind.nats for g in prov.guests)
    assert env["CIM_NATS"] == f"nats://{prov.address}:{CONTRACT.ports.nats}"
    assert env["CIM_SUBJECT"] == probes.inventory_subject("vhost-2")
    # The check's declaration and policy; the lines of the contract; the MAC its LAN NIC carries.
    assert json.loads(env["CIM_DECLARED"]) == {
        "memory_gib": host.hardware.memory_gib,
        "cores": host.hardware.cpu.cores,
        "disks": [{"name": d.name, "device": d.device, "size_gib": d.size_gib} for d in host.hardware.disks],
    }
    assert env["CIM_POLICY"] == domain.inventory.value
    assert env["CIM_STARTED"] == for_host(CONTRACT.install.started, "vhost-2")
    assert env["CIM_DONE"] == for_host(CONTRACT.install.done, "vhost-2")
    assert env["CIM_FAILED"] == for_host(CONTRACT.install.failed, "vhost-2")
    assert env["CIM_MAC"] == host.lan_mac
    # Every line on the serial console (the last console= is /dev/console), once the LAN is up.
    service = installer["service"]
    assert service["serviceConfig"]["StandardOutput"] == "journal+console"
    assert installer["boot"]["kernelParams"][-1].startswith("console=ttyS0")
    assert "network-online.target" in service["after"] and "multi-user.target" in service["wantedBy"]
    assert service["serviceConfig"]["ExecStart"].endswith("-netinstall.sh")
    assert installer["system"]["installer"]["channel"]["enable"] is False


def test_installer_follows_domain_json(cim_copy: Path) -> None:
    data = json.loads((cim_copy / "domain.json").read_text())
    data["inventory"] = "enforce"
    data["hosts"]["vhost-dev"]["guests"][3]["address"] = "192.168.23.3"
    data["hosts"]["vhost-2"]["hardware"]["disks"][0]["size_gib"] = 256
    (cim_copy / "domain.json").write_text(json.dumps(data))
    load_domain(cim_copy)
    env = evaluate(cim_copy, "installer")["service"]["environment"]
    assert env["CIM_POLICY"] == "enforce"
    assert env["CIM_CACHE"] == "http://192.168.23.3:5000" and env["CIM_SYSTEM_URL"].startswith("http://192.168.23.3/")
    assert json.loads(env["CIM_DECLARED"])["disks"][0]["size_gib"] == 256
    # A pinned cache key (the operator's cache-key.pub beside netinstall.nix) replaces the fetched one.
    (cim_copy / "cache-key.pub").write_text("pxe.vhost-dev.cim.local-1:" + "A" * 43 + "=\n")
    env = evaluate(cim_copy, "installer")["service"]["environment"]
    assert env["CIM_CACHE_KEY"] == "pxe.vhost-dev.cim.local-1:" + "A" * 43 + "="


# -- the installer's steps, run here ----------------------------------------------------------------------------------

SAMPLE_REPORT = ROOT / "tests" / "data" / "facter-precision-7920.json"


def jq() -> str:
    found = shutil.which("jq")
    if found is None:
        pytest.skip("jq is not installed")
    return found


def hwcheck(declared: dict[str, Any], report: Path = SAMPLE_REPORT) -> list[str]:
    proc = subprocess.run(
        [jq(), "-r", "-f", str(CIM / "hwcheck.jq"), "--argjson", "declared", json.dumps(declared), str(report)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def declared_of(hw: Hardware) -> dict[str, Any]:
    disks = [{"name": d.name, "device": d.device, "size_gib": d.size_gib} for d in hw.disks]
    return {"memory_gib": hw.memory_gib, "cores": hw.cpu.cores, "disks": disks}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"memory_gib": 64, "cpu": {"model": "Intel Xeon Gold 6230", "cores": 16}},
        {"disks": [{"name": "main", "device": "/dev/nvme0n1", "size_gib": 931.5}]},
        {"disks": [{"name": "main", "device": "/dev/sda", "size_gib": 512}]},
        {"disks": []},
    ],
)
def test_hwcheck_agrees_with_the_pipelines_reconcile(change: dict[str, Any]) -> None:
    # The installer's check names the same differences, in the same words, as the pipeline's inventory does for the
    # facts it checks (memory, CPU cores, disks).
    domain = load_domain(CIM)
    hw = Hardware.model_validate(domain.hosts["vhost-dev"].hardware.model_dump(mode="json") | change)
    detected = inventory.parse_report(json.loads(SAMPLE_REPORT.read_text()), "sample")
    checked = [
        d.describe()
        for d in inventory.reconcile(hw, detected)
        if d.field in ("memory_gib", "cpu.cores") or d.field.startswith("disks.")
    ]
    lines = hwcheck(declared_of(hw))
    assert [line for line in lines if not line.startswith("ok ")] == checked
    assert len(lines) == 2 + len(hw.disks) + sum(1 for line in checked if "(unexpected)" in line)


def test_facter_report_gets_each_interfaces_mac_back(tmp_path: Path) -> None:
    report = json.loads(SAMPLE_REPORT.read_text())
    assert [n.mac for n in inventory.parse_report(report, "sample").nics] == [""]  # facter's number is not a MAC: none
    proc = subprocess.run(
        [jq(), "-f", str(CIM / "facter-macs.jq"), "--argjson", "macs", '{"eno1": "b0:7b:25:1a:7c:41"}'],
        input=json.dumps(report),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    fixed = json.loads(proc.stdout)
    assert [(n.name, n.mac) for n in inventory.parse_report(fixed, "fixed").nics] == [("eno1", "b0:7b:25:1a:7c:41")]
    # Nothing else of the report changes.
    fixed["hardware"].pop("network_interface")
    report["hardware"].pop("network_interface")
    assert fixed == report


NETINSTALL = CIM / "netinstall.sh"


def test_netinstall_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(NETINSTALL)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        proc = subprocess.run([shellcheck, str(NETINSTALL)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout


def test_netinstall_writes_only_a_blank_disk() -> None:
    # Statically: the disk is laid out only on the blank branch, only after the hardware check and a second look at
    # the disk, with disko's format-mount (which wipes nothing), and never with a wipe.
    text = NETINSTALL.read_text()
    main = text[text.index("main() {") :]
    assert re.search(r"elif blank \"\$disk\"; then\s+install_system\s+else", main)
    assert main.count("install_system") == 1
    install_body = text[text.index("install_system() {") : text.index("main() {")]
    check = install_body.index('"$CIM_POLICY" = enforce')
    second_look = install_body.index('blank "$disk" || fail')
    disko = install_body.index('"$CIM_DISKO" ||')
    assert check < second_look < disko < install_body.index("nixos-install --root /mnt")
    assert "wipe-all-disks" not in text and "wipefs --all" not in text.split("\n\n", 1)[1]


def blank(path: Path) -> bool:
    for tool in ("wipefs", "cmp", "dd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    proc = subprocess.run(
        ["bash", "-c", f'. {NETINSTALL}; blank "$1"', "blank", str(path)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CIM_NETINSTALL_SOURCE_ONLY": "1"},
        capture_output=True,
        timeout=60,
    )
    return proc.returncode == 0


def test_blank_means_nothing_at_either_end(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(8 << 20)
    assert blank(disk)
    for offset in (0, 4000, (8 << 20) - 10):
        written = tmp_path / f"written-{offset}.img"
        written.write_bytes(disk.read_bytes())
        with written.open("r+b") as f:
            f.seek(offset)
            f.write(b"x")
        assert not blank(written), offset
    # The very end counts, also on a disk whose size is no whole number of MiB (a GPT's backup header is there).
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes((8 << 20) + 4096 - 1) + b"x")
    assert not blank(odd)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(1 << 20))
    assert not blank(small)


STUB_TOOL = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0")" in
  nixos-facter) cat "$STUB_REPORT" ;;
  curl) while [ $# -gt 0 ]; do if [ "$1" = --output ]; then echo "$STUB_KEY" > "$2"; fi; shift; done ;;
esac
"""


def run_install(
    tmp_path: Path, policy: str, declared: dict[str, Any], disk_bytes: bytes = b"", step: str = "install_system"
) -> tuple[str, str]:
    """A step of netinstall.sh with stand-ins for the tools that touch a machine; its console and the tools it
    called."""
    jq()
    lo = Path("/sys/class/net/lo")
    if not (lo / "statistics" / "rx_bytes").exists():
        pytest.skip("no loopback interface to stand in for the LAN NIC")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ("nixos-facter", "nats", "nixos-install", "umount", "systemctl", "curl", "kexec", "disko-format-mount")
    for tool in tools:
        (bin_dir / tool).write_text(STUB_TOOL)
        (bin_dir / tool).chmod(0o755)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(8 << 20)
        f.write(disk_bytes)
    log = tmp_path / "tools.log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        "CIM_NETINSTALL_SOURCE_ONLY": "1",
        "STUB_LOG": str(log),
        "STUB_REPORT": str(SAMPLE_REPORT),
        "STUB_KEY": "pxe.test-1:key",
        "CIM_STATE": str(tmp_path / "state"),
        "CIM_HOST": "vhost-2",
        "CIM_MAC": (lo / "address").read_text().strip(),
        "CIM_DISK": str(disk),
        "CIM_DISKO": str(bin_dir / "disko-format-mount"),
        "CIM_SYSTEM": "/nix/store/nixos-system-vhost-2",
        "CIM_CACHE": "http://pxe:5000",
        "CIM_CACHE_KEY": "",
        "CIM_CACHE_KEY_URL": "http://pxe/cache-key.pub",
        "CIM_SYSTEM_URL": "http://pxe/vhost-2/system",
        "CIM_KERNEL": "bzImage",
        "CIM_NATS": "nats://hub:4222",
        "CIM_SUBJECT": probes.inventory_subject("vhost-2"),
        "CIM_DECLARED": json.dumps(declared),
        "CIM_POLICY": policy,
        "CIM_HWCHECK": str(CIM / "hwcheck.jq"),
        "CIM_FACTER_MACS": str(CIM / "facter-macs.jq"),
        "CIM_STARTED": for_host(CONTRACT.install.started, "vhost-2"),
        "CIM_DONE": for_host(CONTRACT.install.done, "vhost-2"),
        "CIM_FAILED": for_host(CONTRACT.install.failed, "vhost-2"),
    }
    proc = subprocess.run(
        ["bash", "-c", f". {NETINSTALL}; {step}"], env=env, capture_output=True, text=True, timeout=120
    )
    return proc.stdout, log.read_text()


def test_netinstall_installs_from_the_cache(tmp_path: Path) -> None:
    domain = load_domain(CIM)
    declared = declared_of(domain.hosts["vhost-dev"].hardware) | {"disks": []}  # the sample has its disk undeclared
    console, tools = run_install(tmp_path, "record", declared)
    lines = console.splitlines()
    assert lines[0].startswith(for_host(CONTRACT.install.started, "vhost-2") + " onto ")
    assert "cim-hwcheck: disks.nvme0n1: declared (none), detected /dev/nvme0n1 931.51 GiB" in console
    assert "the domain's policy is record: installing anyway" in console
    assert re.search(r"^cim netboot: the system came over the LAN: \d+ bytes in [\d.]+ s", console, re.M)
    done = [i for i, line in enumerate(lines) if line.startswith(for_host(CONTRACT.install.done, "vhost-2") + ":")]
    assert len(done) == 1 and lines[done[0]].endswith("; powering off")
    assert "cim netboot: the system came over the LAN" in lines[done[0] - 1]
    called = tools.splitlines()
    assert "nats --server nats://hub:4222 pub --force-stdin cim.vhost-2.inventory" in called
    assert called.index("disko-format-mount ") < next(i for i, c in enumerate(called) if c.startswith("nixos-install"))
    assert (
        "nixos-install --root /mnt --system /nix/store/nixos-system-vhost-2 --no-root-passwd --no-channel-copy "
        "--option substituters http://pxe:5000 --option trusted-public-keys pxe.test-1:key"
    ) in called
    assert called[-1] == "systemctl --no-block poweroff"
    # The report it published is the sample with the NICs' MACs put back.
    published = json.loads((tmp_path / "state" / "facter.json").read_text())
    assert inventory.parse_report(published, "published").cpu_cores == 20


def test_netinstall_under_enforce_stops_before_the_disk(tmp_path: Path) -> None:
    domain = load_domain(CIM)
    declared = declared_of(domain.hosts["vhost-2"].hardware)
    console, tools = run_install(tmp_path, "enforce", declared)
    failed = [line for line in console.splitlines() if line.startswith(for_host(CONTRACT.install.failed, "vhost-2"))]
    assert len(failed) == 1
    for fact in ("memory_gib: declared 64 GiB", "cpu.cores: declared 16, detected 20", "disks.main.size_gib"):
        assert fact in failed[0]
    assert failed[0].endswith("was not written")
    assert "disko-format-mount" not in tools and "nixos-install" not in tools
    assert "pub --force-stdin cim.vhost-2.inventory" in tools  # the report went out first
    assert tools.splitlines()[-1] == "systemctl --no-block poweroff"
    assert (tmp_path / "disk.img").read_bytes() == bytes(8 << 20)


def test_netinstall_refuses_a_disk_written_since_it_looked(tmp_path: Path) -> None:
    # install_system looks again right before disko: a disk that is no longer blank is not touched.
    domain = load_domain(CIM)
    declared = declared_of(domain.hosts["vhost-dev"].hardware) | {"disks": []}
    console, tools = run_install(tmp_path, "record", declared, disk_bytes=b"\x00" * 512 + b"EFI PART")
    assert "disko-format-mount" not in tools and "nixos-install" not in tools
    assert for_host(CONTRACT.install.failed, "vhost-2") in console


def test_netinstall_otherwise_boots_the_hosts_system(tmp_path: Path) -> None:
    # No blank disk: the host's own system, fetched from the provisioner (the fetches as the pipeline's netboot test
    # reads them), started with the command line served beside it.
    console, tools = run_install(tmp_path, "record", {}, step="run_system")
    fetched = [m.group(1) for m in re.finditer(netboot.FETCHED, console, re.M)]
    assert fetched == [f"http://pxe/vhost-2/system/{name}" for name in ("bzImage", "initrd", "cmdline")]
    called = tools.splitlines()
    state = tmp_path / "state" / "system"
    assert f"kexec --load {state}/bzImage --initrd={state}/initrd --command-line=pxe.test-1:key" in called
    assert called[-1] == "systemctl --no-block kexec"
    assert "nixos-install" not in tools and "disko-format-mount" not in tools
