"""doit `uptodate` checks: when a task's work is still valid.  Each names one fact the task consumes (another task's
saved value, a spec, the files it published, the records), saves it after a success, and compares it next time.

`cim status` / `cim explain` ask the same checks why a task would run (pipeline.status).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit.dependency import SqliteDB
from doit.task import UptodateCalculator

from pipeline.hashing import XXH3Checker, xxh3_file, xxh3_text

if TYPE_CHECKING:
    from pipeline.artifacts import Records
    from pipeline.context import Evaluations


# doit asks `inspect.signature` of every uptodate check of every task it checks, to pass `task` and `values`: made
# from a class's __call__ each time, that cost 14 us a task (10,000 eval:<host> of a no-op: 0.14 s).  The checks
# below state it once; `inspect.signature` returns a `__signature__` as it is.
_TASK_VALUES = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ("task", "values")]
)


class value_dep(UptodateCalculator):  # type: ignore[misc]
    """Up to date while one saved value of another task (e.g. eval's drvPath) is what it was at our last success."""

    __signature__ = _TASK_VALUES

    def __init__(self, dep_task: str, key: str) -> None:
        self.dep_task = dep_task
        self.key = key
        self.saved_as = f"_value:{dep_task}:{key}"

    def configure_task(self, task: Any) -> None:
        task.task_dep.append(self.dep_task)

    def _current(self) -> Any:
        return (self.get_val(self.dep_task, "_values_:") or {}).get(self.key)

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {self.saved_as: self._current()})
        current = self._current()
        return current is not None and values.get(self.saved_as) == current


class spec_dep:
    """Up to date while a spec (what decides a test besides its image) is the one of our last success.

    Like doit's `config_changed`, but the spec itself is saved beside its digest, so that `cim explain` can name the
    field that changed and its old value: `hosts.vhost-dev.boot.memory_mib: 1024 → 2048`.  The spec is made when doit
    (or `cim explain`) checks the task, not when the graph loads: a 1,000-host graph would otherwise build 1,000 probe
    lists just to run `doit eval`.
    """

    __signature__ = _TASK_VALUES

    def __init__(self, make: Callable[[], dict[str, Any]]) -> None:
        self.make = make

    @functools.cached_property
    def spec(self) -> dict[str, Any]:
        return self.make()

    @functools.cached_property
    def digest(self) -> str:
        return xxh3_text(json.dumps(self.spec, sort_keys=True))

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {"spec_digest": self.digest, "spec": self.spec})
        return bool(values.get("spec_digest") == self.digest)


class outputs_intact:
    """Up to date while every file the task published under *this run's* artifacts directory is still there with the
    digest it was published with: a task whose output was replaced or removed runs again.

    The action returns the files it published as "outputs" (paths relative to the artifacts directory); their stamps
    ([mtime, size, xxh3]) are saved after it ran, as a separate value, so that re-publishing the same bytes changes
    nothing a later task's `getargs` compares (doit re-runs a task whose getargs source returned something else).
    """

    __signature__ = _TASK_VALUES

    def __init__(self, artifacts_dir: Path) -> None:
        self.artifacts_dir = artifacts_dir

    def _stamps(self, task: Any) -> dict[str, Any]:
        stamps = {}
        for rel in task.values.get("outputs") or []:
            path = self.artifacts_dir / rel
            try:
                stat = path.stat()
                stamps[rel] = [stat.st_mtime, stat.st_size, xxh3_file(path)]
            except OSError:
                continue  # gone already: the next check finds it missing
        return {"stamps": stamps}

    def problems(self, values: dict[str, Any]) -> list[str]:
        """Why the outputs are not intact, in words (none when they are)."""
        stamps = values.get("stamps")
        outputs = values.get("outputs") or []
        if not isinstance(stamps, dict) or not stamps:
            return ["no published file is recorded for it"]
        found = [f"the published {rel} was not stamped at its last run" for rel in outputs if rel not in stamps]
        checker = XXH3Checker()
        for rel, (mtime, size, digest) in stamps.items():
            path = self.artifacts_dir / rel
            try:
                stat = os.stat(path)
            except OSError:
                found.append(f"the published {rel} is missing")
                continue
            if checker.check_modified(str(path), stat, (mtime, size, digest)):
                found.append(f"the published {rel} no longer has the digest it was published with")
        return found

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: self._stamps(task))
        return not self.problems(values)


class flake_dep(value_dep):
    """eval:<host>'s uptodate: the flake digest validate saved.  Its first call plans the run's batch: every selected
    eval:<host> whose saved digest differs from the current one (what this check says of each of them)."""

    def __init__(self, evaluations: Evaluations) -> None:
        super().__init__("validate", "flake")
        self.evaluations = evaluations
        self.backend: Any = None

    def setup(self, dep_manager: Any, tasks_dict: dict[str, Any]) -> None:
        super().setup(dep_manager, tasks_dict)
        self.backend = dep_manager.backend

    def __call__(self, task: Any, values: dict[str, Any]) -> bool:
        evaluations = self.evaluations
        if not evaluations.planned:
            current = self._current()
            names = {f"eval:{host}": host for host in evaluations.selected}
            read_saved(self.backend, "eval:", names)
            stale = set()
            for name, host in names.items():
                saved = self.get_val(name, "_values_:") or {}
                if current is None or saved.get(self.saved_as) != current:
                    stale.add(host)
            evaluations.plan(stale)
        return bool(super().__call__(task, values))


# Below this many tasks, doit's own reads (one query a task) cost less than a scan of every row of the prefix.
_SCAN_FROM = 64


def read_saved(backend: Any, prefix: str, names: Collection[str]) -> None:
    """Read what doit saved of the tasks `names` (each `prefix…`) into its sqlite3 backend's cache, in one query.

    doit reads a task's row when it first asks for it, one query a row: 13 us a row at 1,000 hosts, 15 us at 10,000
    (a deeper B-tree, a cache too small for it).  One scan of the prefix's key range reads each row in 4-5 us.  The
    cache holds what doit's own read would have put there (a task without a row: {}); rows already read or written
    this run are left alone.  Another backend is not touched: doit reads it as it always does.
    """
    if not isinstance(backend, SqliteDB) or len(names) < _SCAN_FROM:
        return
    cache = getattr(backend, "_cache", None)  # doit's per-task cache of decoded rows, filled by SqliteDB.get
    conn = getattr(backend, "_conn", None)
    if not isinstance(cache, dict) or conn is None:  # a doit whose SqliteDB keeps them otherwise: doit reads alone
        return
    cursor = conn.cursor()
    cursor.row_factory = None  # (task_id, task_data) tuples; task_data is decoded by doit's "json" converter
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    rows = cursor.execute("select task_id, task_data from doit where task_id >= ? and task_id < ?", (prefix, end))
    for task_id, data in rows:
        if task_id in names and task_id not in cache:
            cache[task_id] = data
    for name in names:
        cache.setdefault(name, {})


def records_unchanged(records: Records) -> Callable[[Any, dict[str, Any]], bool]:
    """Up to date while every artifact record (digests, boot and install results) is what the last release saw."""

    def digest() -> str:
        return xxh3_text(records.digest_source())

    def check(task: Any, values: dict[str, Any]) -> bool:
        task.value_savers.append(lambda: {"records": digest()})
        return values.get("records") == digest()

    return check
