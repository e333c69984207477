"""`cim`: thin commands over the library.  The task graph itself runs with `doit` (see dodo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.diskplan import DiskPlanError
from pipeline.domain import DomainError, json_schema, load_domain
from pipeline.nix import NixError

DEFAULT_DOMAIN = "configs/cim"


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """cim-pipeline: build, boot-test and install-test the images of a NixOS domain (tasks run with `doit`)."""


@main.command()
def schema() -> None:
    """Print the JSON Schema of domain.json."""
    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN)
def validate(domain_dir: Path) -> None:
    """Validate DOMAIN_DIR/domain.json and list its hosts and images."""
    try:
        domain = load_domain(domain_dir)
    except DomainError as exc:
        _fail(exc)
        return
    click.echo(f"{domain.name} ({domain.fqdn}): {len(domain.hosts)} host(s)")
    for name, host in domain.hosts.items():
        images = ", ".join(f"{name}-{fmt.value}" for fmt in host.images) or "no images"
        guests = ", ".join(g.name for g in host.guests) or "no guests"
        click.echo(f"  {name:12} {host.system.value:14} {images:24} guests: {guests}")


@main.command("disk-plan")
@click.argument("host")
@click.option("--domain", "domain_dir", type=click.Path(path_type=Path), default=DEFAULT_DOMAIN, show_default=True)
def disk_plan(host: str, domain_dir: Path) -> None:
    """Show how HOST's disk-config.nix would be installed (partitions, sizes, file systems)."""
    from pipeline.install import plan_for

    try:
        domain = load_domain(domain_dir)
        if host not in domain.hosts:
            raise DomainError(f"{domain_dir / 'domain.json'}: no host {host!r} (hosts: {', '.join(domain.hosts)})")
        plan = plan_for(domain_dir, host, domain.hosts[host])
    except (DomainError, DiskPlanError, NixError) as exc:
        _fail(exc)
        return
    click.echo(f"disk {plan.disk} ({plan.disk_mib} MiB):")
    for line in plan.describe():
        click.echo(f"  {line}")


if __name__ == "__main__":
    main()
