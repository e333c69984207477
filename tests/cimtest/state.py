"""pytest plugin: the whole test run keeps its state (doit DBs, records, kept passes, locks, GC roots, the KVM
verdict) under a temporary root of its own, never in the checkout's `.cim/`.

The controlling pytest process sets CIM_STATE (pipeline.paths) before any test or xdist worker starts; workers and
every doit / cim subprocess inherit it.  So what a user ran in the checkout before (a demo run's kept passes, say)
cannot change a test's outcome, and a test run leaves `.cim/` as it found it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from pipeline.paths import STATE_VARIABLE

_OWNER = "CIM_TEST_STATE_OWNER"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_OWNER):
        return  # a worker: the controller's root, inherited
    os.environ[STATE_VARIABLE] = tempfile.mkdtemp(prefix="cim-test-state-")
    os.environ[_OWNER] = str(os.getpid())


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(_OWNER) == str(os.getpid()):
        shutil.rmtree(os.environ[STATE_VARIABLE], ignore_errors=True)
