"""Install verification (issue [3]): installer ISO + blank disk → install → the disk boots alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.domain import Format

if TYPE_CHECKING:
    from pipeline.tasks import Context


def installable_hosts(ctx: Context) -> list[str]:
    """Hosts with an install section and an ISO to install from (each has an install:<host> task)."""
    return [str(task["name"]) for task in task_install(ctx)]


def task_install(ctx: Context) -> Iterator[dict[str, Any]]:
    yield from ()
