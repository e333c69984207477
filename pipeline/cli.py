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
from pipeline.contract import partition_device
from pipeline.diskplan import DiskPlanError
from pipeline.domain import DOMAIN_FILE, DomainError, json_schema, parse_domain
from pipeline.errors import CimError
from pipeline.install import LayoutPlan, plan_for, target_kind
from pipeline.probes import stats_schema
from pipeline.validate import load_checked, validate

DEFAULT_DOMAIN = "configs/cim"

# What `cim schema NAME` prints: the JSON Schema of each document the pipeline reads or writes.
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "domain": json_schema,
    "manifest": manifest_schema,
    "stats": stats_schema,
}


@click.group()
def cli() -> None:
    """cim-pipeline: build, boot-test and install-test the images of a NixOS domain (tasks run with `doit`)."""


@cli.command()
@click.argument("name", type=click.Choice(sorted(SCHEMAS)), default="domain")
def schema(name: str) -> None:
    """Print the JSON Schema of domain.json (default), manifest.json or the cim.<host>.stats message."""
    click.echo(json.dumps(SCHEMAS[name](), indent=2))


@cli.command("validate")
@click.argument("domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN)
def validate_cmd(domain_dir: Path) -> None:
    """Check DOMAIN_DIR as `doit validate` does (domain.json, flake.nix, named files, .nix syntax); list it."""
    checked = validate(domain_dir)
    domain = checked.domain
    click.echo(
        f"{domain.name} ({domain.fqdn}): {len(domain.hosts)} host(s), {len(checked.nix_files)} .nix file(s) parse"
    )
    for name, host in domain.hosts.items():
        images = ", ".join(f"{name}-{fmt.value}" for fmt in host.images) or "no images"
        guests = ", ".join(g.name for g in host.guests) or "no guests"
        click.echo(f"  {name:12} {host.system.value:14} {images:24} guests: {guests}")


@cli.command("disk-plan")
@click.argument("host")
@click.option("--domain", "domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN, show_default=True)
def disk_plan(host: str, domain_dir: Path) -> None:
    """Show HOST's disk-config.nix as disko lays it out (disks as the install VM presents them, layers, file systems,
    what the installed system is checked for and what cannot be checked), then the demo installer's partitions or
    why it does not make this layout."""
    from pipeline.disklayout import layout_of

    domain = load_checked(domain_dir)
    if host not in domain.hosts:
        raise DomainError(
            f"{domain_dir / 'domain.json'}: no host {host!r}.",
            hint=f"Name one of its hosts: {', '.join(domain.hosts)}.",
        )
    spec = domain.hosts[host]
    if spec.install is None:
        raise DomainError(f"{domain_dir / 'domain.json'}: host {host!r} has no install section (no disk-config).")
    layout, devices = layout_of(domain_dir / spec.install.disk_config)
    click.echo(f"{host}: {domain_dir / spec.install.disk_config} as disko lays it out:")
    for line in layout.describe():
        click.echo(f"  {line}")
    try:
        plan = plan_for(domain_dir, host, spec, devices)  # refuses, naming why, what the demo installer cannot make
        if isinstance(plan, LayoutPlan):
            click.echo(
                f"the demo installer: {len(plan.layout.disks)} blank {plan.disk_mib} MiB disk(s), as shown above"
            )
            return
        kind = target_kind(domain_dir, host, spec, plan)
    except DiskPlanError as exc:  # planned as disko has it; only the demo's installer cannot make it
        said = exc.report()
        click.echo(
            said if "does not make this layout" in said else f"the demo installer does not make this layout: {said}"
        )
        return
    click.echo(f"the demo installer: disk {plan.disk} ({plan.disk_mib} MiB), attached as {kind.value} ({kind.device}):")
    for part, line in zip(plan.partitions, plan.describe(), strict=True):
        click.echo(f"  {line}  [{partition_device(plan.device, part.number)}]")


def _context(domain_dir: Path | None, artifacts_dir: Path | None) -> Any:
    """The run's context as `doit` builds it; paths given are from the current directory, defaults from the
    checkout `doit` runs in (dodo.py's directory, whose .cim/ holds the state of every domain)."""
    from pipeline.context import make_context

    root = Path(__file__).resolve().parent.parent
    return make_context(
        root, (domain_dir or root / DEFAULT_DOMAIN).resolve(), (artifacts_dir or root / "artifacts").resolve()
    )


DOMAIN_OPTION = click.option(
    "--domain",
    "domain_dir",
    type=click.Path(path_type=Path),
    envvar="CIM_DOMAIN",
    help=f"the domain directory (or CIM_DOMAIN; default {DEFAULT_DOMAIN})",
)
ARTIFACTS_OPTION = click.option(
    "--artifacts",
    "artifacts_dir",
    type=click.Path(path_type=Path),
    envvar="CIM_ARTIFACTS",
    help="the artifacts directory (or CIM_ARTIFACTS; default artifacts/ of the checkout)",
)


@cli.command()
@DOMAIN_OPTION
@ARTIFACTS_OPTION
@click.option("--json", "as_json", is_flag=True, help="the same data as JSON, for scripts")
@click.option("--markdown", "as_markdown", is_flag=True, help="a Markdown table, for a CI job summary")
def status(domain_dir: Path | None, artifacts_dir: Path | None, as_json: bool, as_markdown: bool) -> None:
    """Each artifact's image, boot and install results, and which tasks are out of date (runs nothing)."""
    from pipeline import status as st

    data = st.status(_context(domain_dir, artifacts_dir))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif as_markdown:
        click.echo(st.markdown(data), nl=False)
    else:
        from rich.console import Console

        Console().print(st.table(data))


@cli.command()
@click.argument("task")
@DOMAIN_OPTION
@ARTIFACTS_OPTION
@click.option("--json", "as_json", is_flag=True, help="the same as JSON")
def explain(task: str, domain_dir: Path | None, artifacts_dir: Path | None, as_json: bool) -> None:
    """Why TASK (e.g. boot:vhost-dev-iso) would run, or why it is up to date (runs nothing)."""
    from pipeline import status as st

    state = st.explain(_context(domain_dir, artifacts_dir), task)
    click.echo(json.dumps(state.as_json(), indent=2) if as_json else st.explanation(state), nl=as_json)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise inventory.InventoryError(f"{path}: no such {what}.", hint="Give the path of an existing file.") from None
    except json.JSONDecodeError as exc:
        raise inventory.InventoryError(
            f"{path}: not a JSON {what} ({exc}).", hint="Give the file as the tool wrote it."
        ) from None
    except UnicodeDecodeError as exc:
        raise inventory.InventoryError(
            f"{path}: not UTF-8 text ({exc.reason}).", hint="Give the file as the tool wrote it."
        ) from None


@cli.command("inventory")
@click.argument("host")
@DOMAIN_OPTION
@ARTIFACTS_OPTION
@click.option(
    "--facter",
    "facter",
    type=click.Path(path_type=Path),
    default=None,
    help="A facter.json from the real machine (nixos-facter) instead of the last boot test's report.",
)
@click.option("--write", is_flag=True, help="Merge the detected facts into domain.json (validated, atomic).")
def inventory_cmd(
    host: str, domain_dir: Path | None, artifacts_dir: Path | None, facter: Path | None, write: bool
) -> None:
    """Show HOST's declared hardware beside what it detected (the last boot's report, or --facter FILE); --write
    brings domain.json in line."""
    root = Path(__file__).resolve().parent.parent
    domain_dir = domain_dir or root / DEFAULT_DOMAIN
    artifacts_dir = artifacts_dir or root / "artifacts"
    domain = load_checked(domain_dir)
    if host not in domain.hosts:
        raise DomainError(
            f"{domain_dir / DOMAIN_FILE}: no host {host!r}.", hint=f"Name one of its hosts: {', '.join(domain.hosts)}."
        )
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
                "--facter FILE."
                if declared.images
                else "Give --facter FILE.",
            )
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


def _write_inventory(
    domain_dir: Path, host: str, detected: inventory.Detected, machine: inventory.BootMachine | None
) -> None:
    """Merge `detected` into domain.json: validated first, written atomically, other fields and their order kept."""
    path = domain_dir / DOMAIN_FILE
    data = _read_json(path, "domain file")
    if detected.system and detected.system != data["hosts"][host]["system"]:
        raise inventory.InventoryError(
            f"{host} is {data['hosts'][host]['system']} in {path}, but the report is from a {detected.system} machine.",
            hint="Give the report of this host's machine.",
        )
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
