#!/usr/bin/env bash
# The linters CI runs before any test: ruff (lint and format), mypy --strict, and nixfmt where one is installed.
# Needs the dev tools in .venv (`.venv/bin/pip install -e '.[dev]'`, which .ci/run does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${CIM_LINT_BIN:-.venv/bin}  # a test lints a broken copy with the checkout's tools
say() { printf '[lint] %s\n' "$*"; }

say "ruff check"
"$bin/ruff" check .
say "ruff format --check"
"$bin/ruff" format --check .
say "mypy --strict pipeline dodo.py"
"$bin/mypy" --strict pipeline dodo.py
# Neither Debian 12 nor PyPI or npm packages nixfmt: it runs where a Nix user has it (nixfmt-rfc-style), not here.
if command -v nixfmt >/dev/null 2>&1; then
    say "nixfmt --check"
    git ls-files '*.nix' | xargs nixfmt --check
else
    say "nixfmt not installed: .nix files not format-checked (they are parse-checked by the tests)"
fi
say "clean"
