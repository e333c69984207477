"""`cim status` and `cim explain`: the state of each artifact, and why a task would run, in an operator's words.

Read-only and runs nothing (no nix, no VM): it loads the same task graph `doit` loads, and asks doit's own up-to-date
machinery (`Dependency.get_status`) about each task against a private copy of doit's dependency DB, so not even the
DB is touched.  doit's reasons ("uptodate_false", a changed file) are then put into words with the facts the tasks
saved: a file's old and new digest, the drvPath or image digest a task was last run with, the VM/probe spec (kept
beside its digest by `uptodate.spec_dep`) against today's.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from doit.dependency import Dependency, SqliteDB
from doit.loader import load_tasks
from doit.task import result_dep

from pipeline.artifacts import ArtifactRecord, iso_z
from pipeline.context import Context
from pipeline.errors import CimError
from pipeline.hashing import XXH3Checker, xxh3_file
from pipeline.install import install_format
from pipeline.tasks import creators
from pipeline.uptodate import outputs_intact, spec_dep, value_dep

State = Literal["up-to-date", "run", "after"]  # "after": up to date unless a task it depends on changes its fact
_MISSING = object()


class StatusError(CimError):
    """`cim explain` was asked about a task the domain does not have."""


@dataclass(frozen=True)
class TaskState:
    """One task: will it run, and why (or why not), in words."""

    task: str
    state: State
    reasons: list[str] = field(default_factory=list)  # why it runs; why it is up to date when it does not
    after: list[str] = field(default_factory=list)  # tasks that run first and may change what this one consumes

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task, "state": self.state, "reasons": self.reasons, "after": self.after}


# -- spec differences -------------------------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"hosts": {"a": {"boot": {"memory_mib": 1}}}} → {"hosts.a.boot.memory_mib": 1}; list items as `[i]`."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in value:
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
        return out if value else {prefix: []}
    return {prefix: value}


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old → new` for every field that differs (`(none)` where one side lacks it)."""
    before, after = flatten(old), flatten(new)
    changes = []
    for key in [*before, *(k for k in after if k not in before)]:
        was, now = before.get(key, _MISSING), after.get(key, _MISSING)
        if was != now:
            changes.append(f"{key}: {_show(was)} → {_show(now)}")
    return changes


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(none)"
    return repr(value) if isinstance(value, str) else str(value)


def _digest(value: str | None) -> str:
    return f"{value[:12]}…" if value else "(none)"


# -- the graph and doit's view of it ----------------------------------------------------------------------------------


class Graph:
    """The domain's task graph with doit's verdict on each task (read from a private copy of its DB)."""

    def __init__(self, ctx: Context, dep: Dependency) -> None:
        self.ctx = ctx
        self.dep = dep
        tasks = load_tasks(creators(ctx))
        self.tasks = {t.name: t for t in tasks}
        # Group tasks (`build`, `boot`) only gather their sub-tasks; they have no state of their own.
        self.names = [t.name for t in tasks if not t.has_subtask]
        self._states: dict[str, TaskState] = {}

    def _rel(self, path: str | Path) -> str:
        path = Path(path)
        for base in (self.ctx.artifacts_dir, self.ctx.root):
            with contextlib.suppress(ValueError):
                return str(path.relative_to(base))
        return str(path)

    def _saved(self, task: str) -> dict[str, Any]:
        values: dict[str, Any] = self.dep.get_values(task)
        return values

    def state(self, name: str) -> TaskState:
        if name not in self._states:
            self._states[name] = self._compute(name)
        return self._states[name]

    def _compute(self, name: str) -> TaskState:
        task = self.tasks[name]
        if self.dep.backend.get(name, "_values_:") is None:  # doit saves values at every success
            # doit forgets a task that failed, so the artifact's record says whether it ran at all.
            failed = self._failure(name)
            return TaskState(name, "run", [failed or "it has not run successfully yet (doit has no record of it)"])
        status = self.dep.get_status(task, self.tasks, get_log=True)
        if status.status != "up-to-date":
            return TaskState(name, "run", self._why_run(task, status))
        upstream = [dep for dep in self._upstream(name) if self.state(dep).state == "run"]
        if upstream:
            direct = [dep for dep in self._upstream(name, direct=True) if self.state(dep).state != "up-to-date"]
            return TaskState(name, "after", self._why_after(task, upstream), direct or upstream)
        return TaskState(name, "up-to-date", self._why_current(task))

    def _failure(self, name: str) -> str | None:
        """`its last run failed …` when the artifact's record keeps a failed boot or install for `name`."""
        stage, _, subject = name.partition(":")
        host = self.ctx.domain.hosts.get(subject)
        artifact = f"{subject}-{install_format(host).value}" if stage in ("install", "deploy") and host else subject
        record = self.ctx.records.load(artifact) if stage in ("boot", "install", "deploy") else None
        result = getattr(record, stage, None) if record else None
        if result is None or result.result != "fail":
            return None
        return f"its last run failed ({iso_z(result.at) or 'time unknown'}): {result.error or 'see its log'}"

    def _upstream(self, name: str, direct: bool = False) -> list[str]:
        """The tasks `name` depends on (doit's task_dep, a group's sub-tasks expanded), nearest first; only the
        nearest with `direct`."""
        seen: list[str] = []
        todo = list(self.tasks[name].task_dep)
        while todo:
            dep = todo.pop(0)
            if dep in seen or dep not in self.tasks:
                continue
            if self.tasks[dep].has_subtask:
                todo.extend(self.tasks[dep].task_dep)
                continue
            seen.append(dep)
            if not direct:
                todo.extend(self.tasks[dep].task_dep)
        return seen

    # -- words ----------------------------------------------------------------------------------------------------
    def _why_run(self, task: Any, status: Any) -> list[str]:
        reasons: list[str] = []
        for path in status.reasons.get("changed_file_dep", []):
            old = self.dep.backend.get(task.name, path)
            new = xxh3_file(Path(path)) if Path(path).is_file() else None
            if old is None:
                reasons.append(f"{self._rel(path)} is new to it")
            else:
                reasons.append(f"{self._rel(path)} changed (xxh3 {_digest(old[2])} → {_digest(new)})")
        reasons += [f"{self._rel(p)} is missing" for p in status.reasons.get("missing_file_dep", [])]
        reasons += [f"{self._rel(p)} is new to it" for p in status.reasons.get("added_file_dep", [])]
        reasons += [f"{self._rel(p)} is no longer one of its files" for p in status.reasons.get("removed_file_dep", [])]
        for utd, _args, _kwargs in status.reasons.get("uptodate_false", []):
            reasons += self._why_stale(task.name, utd)
        if status.reasons.get("checker_changed"):
            old, new = status.reasons["checker_changed"]
            reasons.append(f"the file checker changed ({old} → {new})")
        if status.reasons.get("has_no_dependencies"):
            reasons.append("it has no dependencies, so it always runs")
        return reasons or [f"doit says it is out of date ({', '.join(status.reasons) or status.status})"]

    def _what(self, utd: value_dep) -> str:
        if utd.key == "xxh3":
            return f"the image digest from {utd.dep_task}"
        if utd.key == "flake":
            return f"the digest of the flake's files from {utd.dep_task}"
        return f"the {utd.key} drvPath from {utd.dep_task}"

    def _why_stale(self, name: str, utd: Any) -> list[str]:
        saved = self._saved(name)
        if isinstance(utd, value_dep):
            current, before = utd._current(), saved.get(utd.saved_as)
            if current is None:
                return [f"{utd.dep_task} has not run yet: {self._what(utd)} is not known"]
            if before is None:
                return [f"{self._what(utd)} was not recorded at its last run"]
            show = _digest if utd.key in ("xxh3", "flake") else str
            return [f"{self._what(utd)} changed: {show(before)} → {show(current)}"]
        if isinstance(utd, spec_dep):
            old = saved.get("spec")
            if not isinstance(old, dict):
                return ["its VM/probe spec was not recorded at its last run (it is from now on)"]
            return spec_changes(old, utd.spec) or ["its VM/probe spec changed"]
        if isinstance(utd, outputs_intact):
            return utd.problems(saved)
        if isinstance(utd, result_dep):  # doit's own check behind `getargs`
            if self.dep.backend.get(utd.dep_name, "_values_:") is None:
                return []  # said by the value check of the same task
            return [f"what {utd.dep_name} handed on changed since its last run"]
        if "records_unchanged" in getattr(utd, "__qualname__", ""):
            return [
                "the records (images, boot and install results) changed since the last release, or manifest.json "
                "or SHA256SUMS is missing"
            ]
        return [f"its check {getattr(utd, '__qualname__', repr(utd))} says it is out of date"]

    def _why_current(self, task: Any) -> list[str]:
        saved = self._saved(task.name)
        reasons = []
        if task.file_dep:
            reasons.append(f"none of its {len(task.file_dep)} input files changed (xxh3 of each)")
        for utd, _args, _kwargs in task.uptodate:
            if isinstance(utd, value_dep):
                current = utd._current()
                show = _digest(current) if utd.key in ("xxh3", "flake") else str(current)
                reasons.append(f"{self._what(utd)} is the one of its last run: {show}")
            elif isinstance(utd, spec_dep):
                reasons.append(f"its VM/probe spec is the one of its last run ({len(flatten(utd.spec))} fields)")
            elif isinstance(utd, outputs_intact):
                reasons.append(f"its published {', '.join(saved.get('outputs') or [])} still have their digests")
            elif "records_unchanged" in getattr(utd, "__qualname__", ""):
                reasons.append("the records are the ones the last release wrote out")
        return reasons

    def _why_after(self, task: Any, upstream: list[str]) -> list[str]:
        reasons = []
        direct = [dep for dep in self._upstream(task.name, direct=True) if self.state(dep).state != "up-to-date"]
        for dep in direct or upstream:
            state = self.state(dep)
            if state.state == "run":
                reasons.append(f"{dep} runs first: " + "; ".join(state.reasons))
            else:
                # Say why the first task of the chain runs (eval:<host> waits on validate, which a changed file runs).
                why = ["; ".join(self.state(a).reasons) for a in state.after if self.state(a).state == "run"]
                reasons.append(
                    f"{dep} may run first (after {', '.join(state.after)})" + (f": {'; '.join(why)}" if why else "")
                )
        consumed = [utd for utd, _a, _k in task.uptodate if isinstance(utd, value_dep)]
        for utd in consumed:
            before = self._saved(task.name).get(utd.saved_as)
            show = _digest(before) if utd.key in ("xxh3", "flake") else str(before)
            reasons.append(f"{task.name} runs after it only if {self._what(utd)} changes; its last run used {show}")
        if any(utd.key not in ("xxh3", "flake") for utd in consumed):
            reasons.append(
                "an edit that leaves the derivation alone (a comment, formatting) gives the same drvPath, "
                "so nothing is rebuilt"
            )
        return reasons


@contextlib.contextmanager
def graph(ctx: Context) -> Iterator[Graph]:
    """The task graph with doit's state, from a private copy of the DB (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="cim-status-") as tmp:
        copy = Path(tmp) / "doit.sqlite3"
        if ctx.dep_file.is_file():
            shutil.copyfile(ctx.dep_file, copy)
        dep = Dependency(SqliteDB, str(copy), checker_cls=XXH3Checker)
        try:
            yield Graph(ctx, dep)
        finally:
            dep.close()  # writes to the private copy only


# -- status -----------------------------------------------------------------------------------------------------------


def _stage(result: Any) -> dict[str, Any]:
    if result is None:
        return {"result": "never"}
    data = {"result": result.result, "at": iso_z(result.at), "seconds": result.seconds}
    for key in ("accel", "error"):
        if getattr(result, key, None) is not None:
            data[key] = getattr(result, key)
    facts = getattr(result, "netboot", None)
    if facts is not None:  # a netboot test: what the LAN gave the host, and what it refused the intruder
        intruder = facts.intruder
        kept_out = intruder is not None and not intruder.lease and not any(intruder.answered.values())
        data["lan"] = (
            f"lease {facts.lease.address or 'none'} from {facts.lease.server or '?'}, {len(facts.fetches)} fetch(es)"
            + (f", intruder {intruder.mac} {'kept out' if kept_out else 'NOT kept out'}" if intruder else "")
        )
        data["netboot"] = facts.model_dump(mode="json")
    network = getattr(result, "network", None)
    if network is not None:  # an install from the LAN: its phases and what the system took over the LAN
        phases = ", ".join(f"{phase} {seconds:g} s" for phase, seconds in result.phases.items())
        data["lan"] = f"phases {phases}; system {network.system_bytes or 0} bytes over the LAN"
        data["network"] = network.model_dump(mode="json")
        data["phases"] = dict(result.phases)
    if getattr(result, "variant", None) is not None:  # a deploy: the generations, what went over SSH, a rollback
        before, target, after = result.before, result.target, result.after
        moved = f"generation {before.number if before else '?'} → {target.number if target else '?'}"
        data["deploy"] = (
            f"{moved}, rolled back to {result.rolled_back_to}"
            if result.rolled_back_to is not None
            else f"{moved}, {result.bytes_copied / 2**20:.1f} MiB over SSH"
            + (f", running {after.number}" if after else "")
        )
        data["phases"] = dict(result.phases)
    return data


def _mtime(path: Path) -> str | None:
    """A file's mtime as records write times (for records older than their `at` fields)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    except OSError:
        return None


def _row(ctx: Context, name: str, record: ArtifactRecord | None, states: dict[str, TaskState]) -> dict[str, Any]:
    artifact = next(a for a in ctx.domain.artifacts() if a.name == name)
    row: dict[str, Any] = {"artifact": name, "host": artifact.host, "format": artifact.format.value}
    if record is None:
        row["image"] = None
        row["boot"] = {"result": "never"}
    else:
        row["image"] = {
            "file": record.file,
            "size": record.size,
            "drvPath": record.drvPath,
            "built": iso_z(record.build.at) or _mtime(ctx.artifacts_dir / record.file),
            "sha256": record.sha256,
        }
        row["boot"] = _stage(record.boot)
    host = ctx.domain.hosts[artifact.host]
    if host.install is not None and artifact.format is install_format(host):
        row["install"] = _stage(record.install if record else None)
        row["deploy"] = _stage(record.deploy if record else None)
    # Stages other issues add to the record (inventory, reproducibility) show once a record carries them.
    dumped = record.model_dump(mode="json") if record else {}
    for key in ("inventory", "reproducible"):
        value = dumped.get(key)
        if value is not None:
            row[key] = value
    row["tasks"] = {
        t: s.state
        for t, s in states.items()
        if t.split(":", 1)[-1] in (name, artifact.host)
        and t.split(":", 1)[0] in ("eval", "build", "boot", "install", "deploy")
    }
    return row


def status(ctx: Context) -> dict[str, Any]:
    """Every artifact's image, boot and install results, and the tasks `doit` would run: the data of `cim status`."""
    records = ctx.records.all()
    with graph(ctx) as g:
        states = {name: g.state(name) for name in g.names}
    return {
        "domain": ctx.domain.name,
        "domain_dir": str(ctx.domain_dir),
        "artifacts_dir": str(ctx.artifacts_dir),
        "artifacts": [_row(ctx, a.name, records.get(a.name), states) for a in ctx.domain.artifacts()],
        "out_of_date": [s.as_json() for s in states.values() if s.state != "up-to-date"],
    }


def explain(ctx: Context, task: str) -> TaskState:
    """Why `task` would run (or why it is up to date): the data of `cim explain`."""
    with graph(ctx) as g:
        if task not in g.tasks or task not in g.names:
            raise StatusError(
                f"{ctx.domain_dir.name} has no task {task!r}.", hint=f"Name one of: {', '.join(g.names)}."
            )
        return g.state(task)


# -- rendering --------------------------------------------------------------------------------------------------------


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _when(at: str | None) -> str:
    """2026-11-27T17:49:46Z → 2026-11-27 17:49Z (a table cell's width)."""
    return f"{at[:10]} {at[11:16]}Z" if at and len(at) >= 16 else "?"


def _short_drv(drv: str) -> str:
    """/nix/store/<32-char hash>-name.drv → the hash's first 12 characters."""
    return Path(drv).name[:12]


def _cells(row: dict[str, Any], extra: list[str]) -> list[str]:
    image = row["image"]
    image_cell = (
        "not built"
        if image is None
        else (
            f"{Path(image['file']).name}, {_mib(image['size'])}, drv {_short_drv(image['drvPath'])}, "
            f"built {_when(image['built'])}"
        )
    )
    cells = [row["artifact"], image_cell, _result_cell(row["boot"])]
    cells.append(_result_cell(row["install"]) if "install" in row else "—")
    for key in extra:
        value = row.get(key)
        cells.append(_result_cell(value) if isinstance(value, dict) and "result" in value else str(value or "—"))
    stale = [f"{t} ({s})" if s == "after" else t for t, s in row["tasks"].items() if s != "up-to-date"]
    cells.append(", ".join(stale) or "up to date")
    return cells


def _result_cell(stage: dict[str, Any]) -> str:
    if stage.get("result") == "never":
        return "never"
    parts = [str(stage["result"])]
    if stage.get("at"):
        parts.append(_when(stage["at"]))
    if stage.get("seconds") is not None:
        parts.append(f"{stage['seconds']} s")
    if stage.get("accel"):
        parts.append(str(stage["accel"]))
    if stage.get("lan"):
        parts.append(str(stage["lan"]))
    if stage.get("deploy"):
        parts.append(str(stage["deploy"]))
    return ", ".join(parts)


def _columns(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    extra = [key for key in ("deploy", "inventory", "reproducible") if any(key in row for row in data["artifacts"])]
    return ["artifact", "image", "boot", "install", *extra, "to run"], extra


def markdown(data: dict[str, Any]) -> str:
    """`cim status --markdown`: a table for a CI job summary, then what would run and why."""
    header, extra = _columns(data)
    lines = [f"### cim status: {data['domain']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in data["artifacts"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, extra)) + " |")
    if data["out_of_date"]:
        lines += ["", "Out of date:"]
        lines += [f"- `{t['task']}`: " + "; ".join(t["reasons"]) for t in data["out_of_date"]]
    return "\n".join(lines) + "\n"


def table(data: dict[str, Any]) -> Any:
    """`cim status` on a terminal: a rich table, then what would run and why."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    header, extra = _columns(data)
    grid = Table(title=f"{data['domain']} ({data['domain_dir']})", title_justify="left")
    for column in header:
        grid.add_column(column, overflow="fold")
    for row in data["artifacts"]:
        cells = _cells(row, extra)
        styled = [Text(cell, style=_style(cell)) for cell in cells]
        grid.add_row(*styled)
    parts: list[Any] = [grid]
    for task in data["out_of_date"]:
        parts.append(Text(f"{task['task']}: " + "; ".join(task["reasons"])))
    return Group(*parts)


def _style(cell: str) -> str:
    if cell.startswith("pass"):
        return "green"
    if cell.startswith("fail"):
        return "bold red"
    if cell in ("never", "not built"):
        return "yellow"
    return ""


def explanation(state: TaskState) -> str:
    """`cim explain TASK` as text."""
    head = {
        "run": f"{state.task} would run:",
        "up-to-date": f"{state.task} is up to date:",
        "after": f"{state.task} is up to date now; it runs after {', '.join(state.after)} only if that changes "
        "what it consumes:",
    }[state.state]
    return "\n".join([head, *(f"  - {reason}" for reason in state.reasons)]) + "\n"
