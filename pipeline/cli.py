"""`cim`: thin commands over the library.  The task graph itself runs with `doit` (see dodo.py).

Library errors (`CimError`) are caught in one place, `main()`, and printed as `error: <message>` plus the hint.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline import inventory
from pipeline.artifacts import atomic_write_text, manifest_schema
from pipeline.domain import DOMAIN_FILE, DomainError, json_schema, parse_domain
from pipeline.errors import CimError
from pipeline.install import plan_for
from pipeline.validate import load_checked, validate

DEFAULT_DOMAIN = "configs/cim"

# What `cim schema NAME` prints: the JSON Schema of each document the pipeline reads or writes.
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {"domain": json_schema, "manifest": manifest_schema}


@click.group()
def cli() -> None:
    """cim-pipeline: build, boot-test and install-test the images of a NixOS domain (tasks run with `doit`)."""


@cli.command()
@click.argument("name", type=click.Choice(sorted(SCHEMAS)), default="domain")
def schema(name: str) -> None:
    """Print the JSON Schema of domain.json (default) or of manifest.json."""
    click.echo(json.dumps(SCHEMAS[name](), indent=2))


@cli.command("validate")
@click.argument("domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN)
def validate_cmd(domain_dir: Path) -> None:
    """Check DOMAIN_DIR as `doit validate` does (domain.json, flake.nix, named files, .nix syntax); list it."""
    checked = validate(domain_dir)
    domain = checked.domain
    click.echo(f"{domain.name} ({domain.fqdn}): {len(domain.hosts)} host(s), {len(checked.nix_files)} .nix file(s) "
               "parse")
    for name, host in domain.hosts.items():
        images = ", ".join(f"{name}-{fmt.value}" for fmt in host.images) or "no images"
        guests = ", ".join(g.name for g in host.guests) or "no guests"
        click.echo(f"  {name:12} {host.system.value:14} {images:24} guests: {guests}")


@cli.command("disk-plan")
@click.argument("host")
@click.option("--domain", "domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN, show_default=True)
def disk_plan(host: str, domain_dir: Path) -> None:
    """Show how HOST's disk-config.nix would be installed (partitions, sizes, file systems)."""
    domain = load_checked(domain_dir)
    if host not in domain.hosts:
        raise DomainError(f"{domain_dir / 'domain.json'}: no host {host!r}.",
                          hint=f"Name one of its hosts: {', '.join(domain.hosts)}.")
    plan = plan_for(domain_dir, host, domain.hosts[host])
    click.echo(f"disk {plan.disk} ({plan.disk_mib} MiB):")
    for line in plan.describe():
        click.echo(f"  {line}")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise inventory.InventoryError(f"{path}: no such {what}.", hint="Give the path of an existing file.") from None
    except json.JSONDecodeError as exc:
        raise inventory.InventoryError(f"{path}: not a JSON {what} ({exc}).",
                                       hint="Give the file as the tool wrote it.") from None
    except UnicodeDecodeError as exc:
        raise inventory.InventoryError(f"{path}: not UTF-8 text ({exc.reason}).",
                                       hint="Give the file as the tool wrote it.") from None


@cli.command("inventory")
@click.argument("host")
@click.option("--domain", "domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN, show_default=True)
@click.option("--facter", "facter", type=click.Path(path_type=Path), default=None,
              help="A facter.json from the real machine (nixos-facter) instead of the last boot test's report.")
@click.option("--artifacts", "artifacts_dir", type=click.Path(path_type=Path), default=Path("artifacts"),
              show_default=True, help="Where the boot tests published inventory.json.")
@click.option("--write", is_flag=True, help="Merge the detected facts into domain.json (validated, atomic).")
def inventory_cmd(host: str, domain_dir: Path, facter: Path | None, artifacts_dir: Path, write: bool) -> None:
    """Show HOST's declared hardware beside what it detected; --write brings domain.json in line."""
    domain = load_checked(domain_dir)
    if host not in domain.hosts:
        raise DomainError(f"{domain_dir / DOMAIN_FILE}: no host {host!r}.",
                          hint=f"Name one of its hosts: {', '.join(domain.hosts)}.")
    declared = domain.hosts[host]
    machine: inventory.BootMachine | None = None
    if facter is not None:
        source = facter
    else:
        reports = [artifacts_dir / f"{host}-{fmt.value}" / "inventory.json" for fmt in declared.images]
        found = [p for p in reports if p.is_file()]
        if not found:
            raise inventory.InventoryError(
                f"no hardware report for {host}: none of {', '.join(map(str, reports)) or '(no images)'} exists.",
                hint=f"Boot it first (`doit domain={domain_dir} boot:{host}-{declared.images[0].value}`) or give "
                     "--facter FILE." if declared.images else "Give --facter FILE.")
        source = found[0]
        machine = inventory.boot_machine(declared)  # a boot VM: what it cannot be stays unchecked
    detected = inventory.parse_report(_read_json(source, "hardware report"), str(source))
    result = inventory.verdict(declared.hardware, detected, domain.inventory, machine)
    click.echo(f"{host}: {domain_dir / DOMAIN_FILE} beside {source}")
    rows = [("fact", "declared", "detected", "status"), *inventory.side_by_side(declared.hardware, detected, result)]
    widths = [min(40, max(len(r[i]) for r in rows)) for i in range(3)]
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    for item in result.unchecked:
        click.echo(f"  unchecked {item.field}: {item.reason}")
    click.echo(f"{host}: {result.summary()}")
    if write:
        _write_inventory(domain_dir, host, detected, machine)


def _write_inventory(domain_dir: Path, host: str, detected: inventory.Detected,
                     machine: inventory.BootMachine | None) -> None:
    """Merge `detected` into domain.json: validated first, written atomically, other fields and their order kept."""
    path = domain_dir / DOMAIN_FILE
    data = _read_json(path, "domain file")
    if detected.system and detected.system != data["hosts"][host]["system"]:
        raise inventory.InventoryError(
            f"{host} is {data['hosts'][host]['system']} in {path}, but the report is from a {detected.system} machine.",
            hint="Give the report of this host's machine.")
    unchecked = machine.unchecked_fields if machine is not None else set()
    data["hosts"][host]["hardware"] = inventory.merged_hardware(data["hosts"][host]["hardware"], detected, unchecked)
    merged = parse_domain(data, f"{path} (with the detected hardware merged in)")
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    after = inventory.verdict(merged.hosts[host].hardware, detected, merged.inventory, machine)
    click.echo(f"{host}: wrote {path}; now it {after.summary()}")


def main() -> None:
    """The `cim` entry point: a library error is the user's message and hint, exit code 2, no traceback."""
    try:
        cli(standalone_mode=False)
    except CimError as exc:
        click.echo(f"error: {exc.report()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
