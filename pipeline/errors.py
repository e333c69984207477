"""The one error type users read.

Every error the library raises for the user derives from `CimError`: its `str()` is the message (what went wrong,
naming the file, field or machine), `hint` is the fix when there is one, and `detail` what a tool said about it
(e.g. the tail of nix's stderr), printed verbatim after the paragraph.  Library code raises; only the entry
points (`dodo.py`, the doit actions in `pipeline.tasks`, the `cim` command) catch `CimError` and print it, with
`report()`, once.
"""

from __future__ import annotations


class CimError(Exception):
    """An error whose message is for the user; `hint` says how to fix it."""

    def __init__(self, message: str, hint: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    def report(self) -> str:
        """What the entry points print: one paragraph (the message, then the fix), then the tool's own words."""
        paragraph = f"{self.message} {self.hint}" if self.hint else self.message
        return f"{paragraph}\n{self.detail}" if self.detail else paragraph
