"""configs/cim's network boot, checked without NixOS (no nixpkgs here): its domain.json validates with a provisioner
and a netboot host, its flake builds `system.build.netboot` as nixpkgs' netboot Hydra job lays it out, and the
provisioner's DHCP/DNS/TFTP settings and the MAC filter are generated from domain.json, not written out.

The generated settings are read by evaluating provisioner.nix and lan.nix with `nix-instantiate --eval` against a
small stand-in for nixpkgs' `lib` (only the functions those two files call), on a copy of configs/cim whose
domain.json is then changed: what domain.json says must show up, and nothing else."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.domain import Format, GuestKind, load_domain

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


# -- the image -------------------------------------------------------------------------------------------------------


def test_cim_flake_builds_netboot_as_the_hydra_job_lays_it_out() -> None:
    flake = code(CIM / "flake.nix")
    assert "nixos/modules/installer/netboot/netboot.nix" in flake
    assert "system.build.netboot" in flake and "(imageOf netbootModule).netboot" in flake
    for name in ("build.kernel", "build.netbootRamdisk", "build.netbootIpxeScript"):
        assert name in flake, name
    assert "nix-support/hydra-build-products" in flake
    # The subtypes the pipeline reads (Format.netboot.product_types), each naming a file of the image itself.
    for subtype in Format.netboot.product_types:
        assert re.search(rf'echo "file {subtype} \$out/', flake), subtype
    # The provisioner serves what the netboot hosts' own configurations build.
    assert "self.nixosConfigurations.${hostName}.config.system.build.netboot" in flake


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
    lan_code = [CIM / name for name in ("lan.nix", "provisioner.nix", "guests.nix", "flake.nix")]
    found = [f"{path.name}: {text}" for path in lan_code for text in sorted(literals) if text in path.read_text()]
    assert found == []


# -- what the provisioner says, evaluated -----------------------------------------------------------------------------

# Just what provisioner.nix and lan.nix call, with nixpkgs' meaning; mkIf and mkMerge stay visible as values.
STUB = r"""
let
  b = builtins;
  mapAttrsToList = f: a: map (n: f n a.${n}) (b.attrNames a);
  lib = {
    inherit (b) attrNames attrValues concatMap concatStringsSep elem filter head length stringLength;
    inherit mapAttrsToList;
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
    systemd = "systemd"; gawk = "gawk";
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
  } { inherit lib pkgs; };
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
}
"""


def evaluate(directory: Path, attribute: str) -> Any:
    exe = nix_instantiate()
    expr = STUB.replace("DIR", json.dumps(str(directory)))  # a JSON string is a Nix string here
    proc = subprocess.run(
        [exe, "--eval", "--strict", "--json", "--expr", expr, "-A", attribute],
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
