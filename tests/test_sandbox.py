"""Where Nix cannot sandbox (no user namespaces: a container that forbids them, or a chroot), the pipeline says so
before the first build, in one paragraph with the choice; CIM_SANDBOX=off builds and the manifest says so.

The no-namespace machine is real: doit runs chrooted into a bind mount of / inside a private mount namespace, where
the kernel refuses CLONE_NEWUSER (a chrooted caller), exactly as in a chroot-based CI runner.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from cimtest.demo import ROOT, needs_demo

from pipeline import nix, process
from pipeline.domain import Sandbox

CHROOTED = """
import os, subprocess, sys
root, cwd, *argv = sys.argv[1:]
subprocess.run(["mount", "--rbind", "/", root], check=True, timeout=30)
os.chroot(root)
os.chdir(cwd)
os.execvp(argv[0], argv)
"""


def in_a_chroot(tmp_path: Path, argv: list[str], env: dict[str, str]) -> process.subprocess.CompletedProcess[str]:
    """`argv` run chrooted into a bind mount of / in a mount namespace of its own (so the mount leaves no trace)."""
    root = tmp_path / "chroot"
    root.mkdir(exist_ok=True)
    wrapper = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", CHROOTED]
    return process.run([*wrapper, str(root), str(ROOT), *argv], timeout=600, env={**os.environ, **env})


def test_sandbox_modes_and_their_nix_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIM_SANDBOX", raising=False)
    assert nix.sandbox_mode() is Sandbox.on
    assert [Sandbox(m).nix_value for m in ("on", "relaxed", "off")] == ["true", "relaxed", "false"]
    monkeypatch.setenv("CIM_SANDBOX", "maybe")
    with pytest.raises(nix.NixError) as bad:
        nix.sandbox_mode()
    assert "CIM_SANDBOX='maybe'" in str(bad.value) and "on (the default), relaxed or off" in bad.value.report()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace and a chroot need root")


@pytest.mark.nix
@needs_root
@needs_demo
def test_without_user_namespaces_build_explains_and_off_builds(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    doit = [sys.executable, "-m", "doit", "domain=configs/demo", f"artifacts={artifacts}", "build:vhost-dev-iso"]
    env = {"CIM_STATE": str(tmp_path / "state"), "CIM_DEBUG": "1"}

    refused = in_a_chroot(tmp_path, doit, env)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert "Nix cannot sandbox builds on this machine" in out and "CIM_SANDBOX=off" in out, out
    assert "Traceback" not in out, out
    assert not [line for line in out.splitlines() if line.startswith("[debug] $ nix") and " build " in line], (
        "said before the first build, not after nix failed"
    )

    built = in_a_chroot(tmp_path, doit, {**env, "CIM_SANDBOX": "off"})
    out = built.stdout + built.stderr
    assert built.returncode == 0, out
    assert any("--option sandbox false build" in line for line in out.splitlines() if line.startswith("[debug]")), out
    assert "sandbox: off (CIM_SANDBOX): this image is not built hermetically" in out
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["artifacts"]["vhost-dev-iso"]["build"]["sandbox"] == "off", manifest
