#!/usr/bin/env python3
"""Plan every disko example in DIR (nix-community/disko's example/*.nix) as `cim disk-plan` does for a copy of a
domain whose host's disk-config.nix is that example: how many plan, how many are refused (and why), how many the
demo installer makes.  Usage: .venv/bin/python scripts/disko_examples.py DIR [DOMAIN]"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    examples = sorted(Path(sys.argv[1]).glob("*.nix"))
    domain = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "configs" / "demo"
    planned = refused = crashed = demo = 0
    for example in examples:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "domain"
            shutil.copytree(domain, copy, ignore=shutil.ignore_patterns("result*"))
            shutil.copy(example, copy / "disk-config.nix")
            proc = subprocess.run(
                [str(ROOT / ".venv" / "bin" / "cim"), "disk-plan", "vhost-dev", "--domain", str(copy)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        if "Traceback" in proc.stderr or proc.returncode not in (0, 2):
            crashed += 1
            print(f"CRASH   {example.name}: {proc.stderr.strip()[-300:]}")
        elif proc.returncode == 0:
            planned += 1
            makes = "the demo installer:" in proc.stdout
            demo += makes
            print(f"planned {example.name}{'' if makes else ' (the demo installer does not make it)'}")
        else:
            refused += 1
            print(f"refused {example.name}: {proc.stderr.strip().removeprefix('error: ')}")
    print(f"{len(examples)} examples: {planned} planned ({demo} the demo installer makes), {refused} refused, ", end="")
    print(f"{crashed} crashed")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
