"""Where a checkout keeps what its runs leave behind: `CIM_STATE`, or `<checkout>/.cim`.

Under it: `state/` (one doit DB, records, GC roots and VM work dirs per domain and artifacts directory), `results/`
(kept passes, unless CIM_RESULTS moves them), `locks/` (run locks), the machine's KVM verdict, and the last internal
traceback.  One variable moves all of it, so that a test suite, a CI job or a second user of one checkout can run
against state of its own while the checkout's `.cim/` stays as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_VARIABLE = "CIM_STATE"


def state_root(root: Path) -> Path:
    """The state directory of the checkout at `root`: $CIM_STATE (absolute, or relative to `root`) or root/.cim."""
    value = os.environ.get(STATE_VARIABLE, "").strip()
    return (root / value).resolve() if value else root / ".cim"
