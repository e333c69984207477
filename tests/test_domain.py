"""The domain model: what domain.json may say, and the one-paragraph errors a user reads when it says something else."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from pipeline.domain import (
    Builder,
    Domain,
    DomainError,
    Format,
    System,
    json_schema,
    load_domain,
    parse_domain,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_JSON = ROOT / "configs" / "demo" / "domain.json"


@pytest.fixture
def demo_data() -> dict[str, Any]:
    """The demo's domain.json as plain data, ready to be broken."""
    return copy.deepcopy(json.loads(DEMO_JSON.read_text()))


def write_domain(directory: Path, data: dict[str, Any] | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data, indent=2)
    (directory / "domain.json").write_text(text)
    return directory


def domain_error(directory: Path) -> str:
    """The message load_domain() raises for `directory`, checked for the properties every such message has."""
    with pytest.raises(DomainError) as info:
        load_domain(directory)
    message = str(info.value)
    assert "\n" not in message.strip(), f"not one paragraph:\n{message}"
    assert "Traceback" not in message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), (
        "the user's message hides the cause chain (raise … from None)"
    )
    return message


# -- the demo is valid ------------------------------------------------------------------------------------------------


def test_demo_domain_loads() -> None:
    domain = load_domain(DEMO_JSON.parent)
    assert domain.fqdn == "cim.local"
    assert list(domain.hosts) == ["vhost-dev", "vhost-pi", "vhost-2"]
    assert domain.hosts["vhost-dev"].system is System.x86_64_linux
    assert domain.hosts["vhost-pi"].system is System.aarch64_linux
    assert [a.name for a in domain.artifacts()] == ["vhost-dev-iso", "vhost-pi-sd", "vhost-2-netboot"]
    assert [a.format for a in domain.artifacts()] == [Format.iso, Format.sd, Format.netboot]
    assert {g.name for g in domain.hosts["vhost-dev"].guests} == {"dev", "dns", "nats", "pxe"}


def test_domain_is_frozen() -> None:
    domain = load_domain(DEMO_JSON.parent)
    with pytest.raises(pydantic.ValidationError):
        domain.hosts["vhost-dev"].hardware.memory_gib = 2


# -- errors: one paragraph naming the file, the field and the fix ----------------------------------------------------


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    text = DEMO_JSON.read_text().replace('"fqdn": "cim.local",', '"fqdn": "cim.local"', 1)
    assert text != DEMO_JSON.read_text()
    expected_line = next(i for i, ln in enumerate(text.splitlines(), 1) if '"description"' in ln)
    domain = write_domain(tmp_path / "d", text)
    message = domain_error(domain)
    assert str(domain / "domain.json") in message
    assert "malformed JSON" in message
    assert f"line {expected_line}, column 3" in message


def test_unknown_field_is_named_with_its_path(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-dev"]["hardware"]["memroy_gib"] = 2
    domain = write_domain(tmp_path / "d", demo_data)
    message = domain_error(domain)
    assert str(domain / "domain.json") in message
    assert "'hosts.vhost-dev.hardware.memroy_gib' is not known" in message


@pytest.mark.parametrize(
    "name", ["vhost;rm -rf", "vhost$(id)", "Vhost-dev", "-vhost", "vhost-", "vhost.dev", "a" * 64, ""]
)
def test_host_name_must_be_an_rfc1123_label(tmp_path: Path, demo_data: dict[str, Any], name: str) -> None:
    demo_data["hosts"][name] = demo_data["hosts"].pop("vhost-pi")
    domain = write_domain(tmp_path / "d", demo_data)
    message = domain_error(domain)
    assert str(domain / "domain.json") in message
    assert f"hosts key {name!r}" in message
    assert "RFC 1123" in message


@pytest.mark.parametrize("name", ["a", "vhost-3", "vhost2", "a" * 63])
def test_valid_host_names_pass(tmp_path: Path, demo_data: dict[str, Any], name: str) -> None:
    demo_data["hosts"][name] = demo_data["hosts"].pop("vhost-pi")
    assert name in load_domain(write_domain(tmp_path / "d", demo_data)).hosts


@pytest.mark.parametrize("key", ["password", "initial_password"])
def test_clear_text_password_is_rejected(tmp_path: Path, demo_data: dict[str, Any], key: str) -> None:
    demo_data["accounts"][0][key] = "hunter2"
    domain = write_domain(tmp_path / "d", demo_data)
    message = domain_error(domain)
    assert str(domain / "domain.json") in message
    assert "'accounts.0'" in message
    assert "clear-text passwords are not allowed" in message
    assert "hunter2" not in message, "the secret itself must not be echoed"


def test_hashed_password_must_be_a_crypt_hash(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["accounts"][0]["hashed_password"] = "hunter2"
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "accounts.0.hashed_password" in message and "crypt(3)" in message
    demo_data["accounts"][0]["hashed_password"] = "$6$salt$hash"
    assert load_domain(write_domain(tmp_path / "ok", demo_data)).accounts[0].hashed_password == "$6$salt$hash"


def test_ssh_key_must_look_like_one(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["accounts"][0]["ssh_keys"] = ["not a key"]
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "accounts.0.ssh_keys" in message and "is not an SSH public key" in message


def test_sd_image_on_x86_64_host_is_rejected(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-dev"]["images"] = ["iso", "sd"]
    domain = write_domain(tmp_path / "d", demo_data)
    message = domain_error(domain)
    assert str(domain / "domain.json") in message
    assert "hosts.vhost-dev" in message
    assert "'sd' image is for aarch64-linux" in message


def test_iso_image_on_aarch64_host_is_rejected(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-pi"]["images"] = ["iso"]
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "hosts.vhost-pi" in message and "'iso' image" in message


def test_unknown_image_format_and_system(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-dev"]["images"] = ["qcow2"]
    demo_data["hosts"]["vhost-pi"]["system"] = "riscv64-linux"
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "hosts.vhost-dev.images.0" in message
    assert "hosts.vhost-pi.system" in message


def test_missing_required_field(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    del demo_data["hosts"]["vhost-pi"]["hardware"]["cpu"]
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "field 'hosts.vhost-pi.hardware.cpu' is required but missing" in message


def test_install_disk_must_exist(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-dev"]["install"]["disk"] = "nvme"
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "install.disk 'nvme' is not among hardware.disks" in message


def test_duplicate_guest_names(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["hosts"]["vhost-dev"]["guests"].append({"name": "dns", "kind": "dns", "address": "10.23.0.20"})
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "hosts.vhost-dev.guests" in message and "repeated: dns" in message


def test_many_errors_are_capped_in_one_paragraph(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    for i in range(8):
        demo_data[f"typo{i}"] = 1
    message = domain_error(write_domain(tmp_path / "d", demo_data))
    assert "(and 3 more)" in message
    assert message.count("is not known") == 5


def test_missing_domain_json(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    message = domain_error(tmp_path / "d")
    assert str(tmp_path / "d" / "domain.json") in message
    assert "file not found" in message


def test_missing_domain_directory(tmp_path: Path) -> None:
    message = domain_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message
    assert "no such domain directory" in message


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "domain.json").write_bytes(b'{"name": "\xff"}')
    message = domain_error(tmp_path / "d")
    assert "not UTF-8" in message and "domain.json" in message


def test_parse_domain_names_its_source(demo_data: dict[str, Any]) -> None:
    demo_data["fqdn"] = "cim..local"
    with pytest.raises(DomainError, match=r"^somewhere/domain\.json: field 'fqdn'"):
        parse_domain(demo_data, "somewhere/domain.json")


def test_empty_hosts(demo_data: dict[str, Any]) -> None:
    demo_data["hosts"] = {}
    with pytest.raises(DomainError, match="at least one host"):
        parse_domain(demo_data, "x")


# -- schema, enums, builders ------------------------------------------------------------------------------------------


def test_json_schema_export() -> None:
    schema = json_schema()
    assert schema["type"] == "object"
    assert "hosts" in schema["properties"]
    assert {"name", "fqdn", "hosts"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    assert set(defs["Host"]["properties"]) >= {"system", "hardware", "guests", "images", "boot", "install"}
    assert defs["Format"]["enum"] == ["iso", "sd", "netboot"]
    assert set(defs["System"]["enum"]) == {"x86_64-linux", "aarch64-linux"}
    json.dumps(schema)  # serialisable as it is, for `cim schema`


def test_system_enum() -> None:
    assert System("x86_64-linux") is System.x86_64_linux
    assert str(System.x86_64_linux) == "x86_64-linux"  # a StrEnum: usable wherever Nix wants the string
    assert f"{System.aarch64_linux}" == "aarch64-linux"
    assert System.x86_64_linux.arch == "x86_64"
    assert System.x86_64_linux.qemu_binary == "qemu-system-x86_64"
    assert System.x86_64_linux.debian_arch == "amd64"
    assert System.aarch64_linux.arch == "aarch64"
    assert System.aarch64_linux.qemu_binary == "qemu-system-aarch64"
    assert System.aarch64_linux.debian_arch == "arm64"
    with pytest.raises(ValueError):
        System("riscv64-linux")


def test_format_enum() -> None:
    assert Format("iso") is Format.iso
    assert (Format.iso.attribute, Format.iso.product_type, Format.iso.extension) == ("isoImage", "iso", ".iso")
    assert (Format.sd.attribute, Format.sd.product_type, Format.sd.extension) == ("sdImage", "sd-image", ".img")
    assert f"{Format.sd}" == "sd"
    with pytest.raises(ValueError):
        Format("qcow2")


@pytest.mark.parametrize("uri", ["http://builder", "ssh-ng://nix@builder; rm -rf /", "builder", "ssh-ng://a b"])
def test_builder_uri_must_be_ssh(uri: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="ssh://"):
        Builder(uri=uri, systems=(System.aarch64_linux,))


def test_builders_in_domain(tmp_path: Path, demo_data: dict[str, Any]) -> None:
    demo_data["builders"] = [{"uri": "ssh-ng://nix@arm", "systems": ["aarch64-linux"], "max_jobs": 2}]
    domain = load_domain(write_domain(tmp_path / "d", demo_data))
    assert isinstance(domain, Domain)
    assert domain.builders[0].machines_line() == "ssh-ng://nix@arm aarch64-linux - 2 1 - - -"
