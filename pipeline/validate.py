"""Every check of a domain directory, in one place: `cim validate DIR` and `doit domain=DIR validate` both call
`validate()`, so they accept and refuse exactly the same directories.

`load_checked()` is the part that runs no subprocess (domain.json against the model, flake.nix present, every file a
host names present): what `dodo.py` does while it loads the task graph.  `validate()` adds the `.nix` parse check,
which runs `nix-instantiate --parse` through the nix funnel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import contract, nix
from pipeline.domain import DOMAIN_FILE, Domain, DomainError, load_domain


def flake_files(domain_dir: Path) -> list[str]:
    """The files that make up the flake, sorted: what the flake-input digest covers (flake.lock included).

    Hidden files, `result*` links and other symlinks are left out: they are not the flake's sources.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(domain_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name.startswith("result") or path.is_symlink():
                continue
            files.append(str(path))
    return files


def load_checked(domain_dir: Path) -> Domain:
    """domain.json validated, flake.nix present, every file a host names present, its contract.json the pipeline's;
    raises DomainError or ContractError."""
    domain = load_domain(domain_dir)
    if not (domain_dir / "flake.nix").is_file():
        raise DomainError(
            f"{domain_dir / 'flake.nix'}: file not found.",
            hint="A domain directory needs a flake.nix exposing nixosConfigurations.<host> for every host in "
            "domain.json (see configs/demo/flake.nix).",
        )
    for name, host in domain.hosts.items():
        if host.install and not (domain_dir / host.install.disk_config).is_file():
            raise DomainError(
                f"{domain_dir / DOMAIN_FILE}: field 'hosts.{name}.install.disk_config' names "
                f"{host.install.disk_config}, which does not exist in {domain_dir}.",
                hint="Add the disko file or fix the name.",
            )
    contract.check_domain_copy(domain_dir)
    return domain


@dataclass(frozen=True)
class Validation:
    """A domain directory that passed every check."""

    domain: Domain
    files: tuple[str, ...]
    nix_files: tuple[str, ...]


def validate(domain_dir: Path, files: list[str] | None = None) -> Validation:
    """Every check of `domain_dir`: `load_checked()`, then each `.nix` file parses; raises DomainError or NixError.

    `files` is the flake's file list when the caller already walked it (the task graph does, once per run).
    """
    domain = load_checked(domain_dir)
    files = flake_files(domain_dir) if files is None else files
    nix_files = sorted(f for f in files if f.endswith(".nix"))
    for path in nix_files:
        problem = nix.parse_error(Path(path))
        if problem is not None:
            raise DomainError(f"{path}: Nix syntax error: {problem}", hint="Fix the syntax there and run again.")
    return Validation(domain, tuple(files), tuple(nix_files))
