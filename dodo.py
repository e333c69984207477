"""doit entry point: `doit domain=DIR [artifacts=DIR] [wait=no|SECONDS] [task …]` (or CIM_DOMAIN / CIM_ARTIFACTS /
CIM_WAIT); the default domain is configs/cim, the default artifacts directory artifacts/.

Tasks: validate, eval:<host>, build:<host>-<format>, boot:<host>-<format>, install:<host>, deploy:<host>, release
(the default); check:<host>-<format> (rebuild and compare, not in the default run).  `generation=broken` (or
CIM_GENERATION) makes deploy:<host> deploy a generation whose boot never completes, to see it roll back.
CIM_RESULTS moves the kept passes
(default .cim/results).

A run that executes tasks holds the artifacts directory's lock (pipeline.runlock) from here until it ends; another run
of the same domain waits for it (or, with wait=no, refuses).  SIGINT, SIGTERM and SIGHUP stop every VM and nix
process and end the run (pipeline.process).  `doit list` / `info` / `help` take no lock and never wait.
"""

import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doit import get_var

from pipeline import context, process, runlock, tasks
from pipeline.errors import CimError
from pipeline.hashing import XXH3Checker

ROOT = Path(__file__).resolve().parent
# Loading a graph makes four tasks per host, all alive until the run ends: with the cyclic GC scanning them again and
# again, loading 10,000 hosts cost 2.6x per host what 1,000 did (bench/scale.py).  Off while doit loads the graph;
# the reporter freezes what was loaded and turns it back on when the first task runs (pipeline.context).  The one
# collection of the run is here, while the heap holds only the imports (~15 ms): made after the graph loaded, it
# scanned every task of it (0.6 s of a 10,000-host no-op), and loading leaves no garbage worth it (a few
# importlib.metadata dicts, no loop or socket; they stay frozen).
gc.collect()
gc.disable()
process.stop_on_signals()
RUN_LOCK = None  # held (module global) until the process ends
try:
    CTX = context.make_context(
        ROOT,
        Path(get_var("domain", os.environ.get("CIM_DOMAIN", "configs/cim"))),
        Path(get_var("artifacts", os.environ.get("CIM_ARTIFACTS", "artifacts"))),
        Path(os.environ["CIM_RESULTS"]) if os.environ.get("CIM_RESULTS") else None,
        get_var("generation", os.environ.get("CIM_GENERATION", "next")),
    )
    if context.doit_command(sys.argv[1:]) not in context.READ_ONLY_COMMANDS:
        RUN_LOCK = context.begin_run(CTX, runlock.parse_wait(get_var("wait", os.environ.get("CIM_WAIT"))))
except CimError as exc:
    # Bad input is the user's to fix: one paragraph, no traceback, nothing run, artifacts/ untouched.
    sys.stderr.write(f"error: {exc.report()}\n")
    sys.exit(2)

DOIT_CONFIG = {
    "default_tasks": ["release"],
    "backend": "sqlite3",
    "dep_file": str(CTX.dep_file),
    "check_file_uptodate": XXH3Checker,
    "par_type": "thread",  # tasks wait on nix and QEMU processes; threads are enough and share the DB handle
    # Parallel by default: one worker per core this process may use (`-n N` overrides it; `-n 0` runs serially).
    "num_process": len(os.sched_getaffinity(0)),
    # doit's console output, plus telling the batched evaluation which eval:<host> tasks this run selected.
    "reporter": context.reporter_for(CTX),
    "verbosity": 2,
}
CTX.state_dir.mkdir(parents=True, exist_ok=True)
# The domain lives as long as the run: out of the GC's sight too, so that the collection at exit does not scan it
# (`doit list` freezes no graph: 0.08 s at 10,000 hosts).
gc.freeze()


def task_validate() -> dict[str, Any]:
    return tasks.task_validate(CTX)


def task_eval() -> Iterator[dict[str, Any]]:
    yield from tasks.task_eval(CTX)


def task_build() -> Iterator[dict[str, Any]]:
    yield from tasks.task_build(CTX)


def task_boot() -> Iterator[dict[str, Any]]:
    yield from tasks.task_boot(CTX)


def task_install() -> Iterator[dict[str, Any]]:
    yield from tasks.task_install(CTX)


def task_deploy() -> Iterator[dict[str, Any]]:
    yield from tasks.task_deploy(CTX)


def task_check() -> Iterator[dict[str, Any]]:
    yield from tasks.task_check(CTX)


def task_release() -> dict[str, Any]:
    return tasks.task_release(CTX)
