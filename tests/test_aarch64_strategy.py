"""How an aarch64-linux image gets built: native, local emulation, a remote builder, or a failure naming both fixes.

Unit tests of `plan_build` on constructed facts and of `Builder.machines_line`, and one integration test that runs
`doit build:vhost-pi-sd` on a machine that can do none of it.  That machine is made without touching the real one
(other tests build aarch64 in parallel): the doit process runs in a private mount namespace where binfmt_misc is
unmounted, with NIX_CONFIG emptying the local Nix's extra-platforms.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cimtest.demo import ROOT, needs_demo

from pipeline import nix
from pipeline.domain import Builder, System
from pipeline.nix import BINFMT_DIR, BuildPlan, NixError, NixFacts, Strategy, plan_build
from pipeline.process import run

AARCH64 = System.aarch64_linux
QEMU = {"qemu-aarch64": "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"}
X86 = "x86_64-linux"


def builder(**fields: object) -> Builder:
    return Builder.model_validate({"uri": "ssh-ng://nix@pi-builder", "systems": ["aarch64-linux"], **fields})


# -- plan_build ------------------------------------------------------------------------------------------------------


def test_native_when_the_local_system_is_the_target() -> None:
    plan = plan_build(AARCH64, NixFacts(system="aarch64-linux"), [builder()])
    assert plan == BuildPlan(Strategy.native, AARCH64, "the local Nix is aarch64-linux")
    assert plan_build(System.x86_64_linux, NixFacts(system=X86)).strategy is Strategy.native


def test_emulation_needs_extra_platforms_and_binfmt() -> None:
    plan = plan_build(AARCH64, NixFacts(system=X86, extra_platforms=("aarch64-linux",), binfmt=QEMU), [builder()])
    assert plan.strategy is Strategy.emulation  # preferred to a remote builder: no network, no other machine
    assert plan.options == ()
    assert "aarch64-binfmt-P" in plan.reason and "extra-platforms" in plan.reason
    assert plan.describe().startswith("aarch64-linux via emulation: ")


@pytest.mark.parametrize(
    "facts",
    [
        NixFacts(system=X86, extra_platforms=("aarch64-linux",)),  # Nix would try, but the kernel cannot run it
        NixFacts(system=X86, binfmt=QEMU),  # the kernel could run it, but Nix refuses the system
        NixFacts(system=X86, extra_platforms=("aarch64-linux",), binfmt={"qemu-arm": "/usr/bin/qemu-arm"}),
    ],
    ids=["no-binfmt", "no-extra-platforms", "other-binfmt"],
)
def test_half_an_emulator_is_not_emulation(facts: NixFacts) -> None:
    assert plan_build(AARCH64, facts, [builder()]).strategy is Strategy.remote
    with pytest.raises(NixError):
        plan_build(AARCH64, facts)


def test_domain_builder_for_the_system_goes_on_the_command_line() -> None:
    x86_only = Builder(uri="ssh://nix@x86-builder", systems=(System.x86_64_linux,))
    pi = builder(ssh_key="/root/.ssh/id_builder", max_jobs=4, public_host_key="c3NoLWVkMjU1MTkgQUFBQQ==")
    plan = plan_build(AARCH64, NixFacts(system=X86, builders="ssh://other aarch64-linux"), [x86_only, pi])
    assert plan.strategy is Strategy.remote
    assert "ssh-ng://nix@pi-builder" in plan.reason and "x86-builder" not in plan.reason
    assert plan.options == (
        "--option",
        "builders",
        "ssh-ng://nix@pi-builder aarch64-linux /root/.ssh/id_builder 4 1 - - c3NoLWVkMjU1MTkgQUFBQQ==",
        "--option",
        "builders-use-substitutes",
        "false",
    )


def test_several_domain_builders_join_as_one_builders_setting() -> None:
    two = [builder(), builder(uri="ssh://nix@pi2")]
    (_, _, machines, *_rest) = plan_build(AARCH64, NixFacts(system=X86), two).options
    assert machines == "ssh-ng://nix@pi-builder aarch64-linux - 1 1 - - - ; ssh://nix@pi2 aarch64-linux - 1 1 - - -"


@pytest.mark.parametrize(
    "setting",
    [
        "ssh://nix@pi aarch64-linux /root/.ssh/id 2",
        "ssh://nix@big x86_64-linux - 8 ; ssh-ng://nix@pi x86_64-linux,aarch64-linux",
        "# a comment line\nssh://nix@pi aarch64-linux",
    ],
)
def test_nix_builders_setting_inline(setting: str) -> None:
    plan = plan_build(AARCH64, NixFacts(system=X86, builders=setting))
    assert plan.strategy is Strategy.remote
    assert plan.options == ()  # Nix uses its own setting; nothing to add
    assert "Nix's own builders setting" in plan.reason


def test_nix_builders_setting_from_a_machines_file(tmp_path: Path) -> None:
    machines = tmp_path / "machines"
    machines.write_text("# builders\nssh://nix@big x86_64-linux - 8\nssh://nix@pi aarch64-linux - 1\n")
    plan = plan_build(AARCH64, NixFacts(system=X86, builders=f"@{machines}"))
    assert plan.strategy is Strategy.remote and str(machines) in plan.reason

    machines.write_text("ssh://nix@big x86_64-linux - 8\n# ssh://nix@pi aarch64-linux\n")
    with pytest.raises(NixError):
        plan_build(AARCH64, NixFacts(system=X86, builders=f"@{machines}"))
    with pytest.raises(NixError):  # Nix's default, @/etc/nix/machines, often names no file at all
        plan_build(AARCH64, NixFacts(system=X86, builders=f"@{tmp_path / 'missing'}"))


def test_no_way_to_build_names_both_fixes() -> None:
    with pytest.raises(NixError) as caught:
        plan_build(
            AARCH64,
            NixFacts(system=X86, builders="ssh://nix@big x86_64-linux"),
            [Builder(uri="ssh://nix@x86", systems=(System.x86_64_linux,))],
        )
    message = str(caught.value)
    assert "\n" not in caught.value.report(), "one paragraph"
    assert_names_both_fixes(message)
    assert "does not list aarch64-linux" in message and "no binfmt_misc interpreter for aarch64" in message


def assert_names_both_fixes(message: str) -> None:
    # (1) local emulation: the package, the binfmt entry, the nix.conf line.
    assert "(1) emulate it locally" in message
    assert "qemu-user-static" in message and f"{BINFMT_DIR}/qemu-aarch64" in message
    assert "extra-platforms = aarch64-linux" in message
    # (2) a remote builder: domain.json's builders, or Nix's own.
    assert "(2) use a remote builder" in message
    assert '"builders"' in message and "domain.json" in message and "/etc/nix/machines" in message


# -- Builder.machines_line -------------------------------------------------------------------------------------------


def test_machines_line_fields() -> None:
    assert builder().machines_line() == "ssh-ng://nix@pi-builder aarch64-linux - 1 1 - - -"
    full = builder(
        uri="ssh://nix@pi",
        systems=["aarch64-linux", "x86_64-linux"],
        ssh_key="/keys/pi",
        max_jobs=2,
        speed_factor=3,
        features=["big-parallel", "kvm"],
        public_host_key="c3NoLWVkMjU1MTkgQUFBQQ==",
    )
    # uri, systems, key, max jobs, speed factor, supported features, mandatory features, host key
    assert full.machines_line().split(" ") == [
        "ssh://nix@pi",
        "aarch64-linux,x86_64-linux",
        "/keys/pi",
        "2",
        "3",
        "big-parallel,kvm",
        "-",
        "c3NoLWVkMjU1MTkgQUFBQQ==",
    ]


def test_machines_line_names_the_key_never_its_contents(tmp_path: Path) -> None:
    key = tmp_path / "id_builder"
    secret = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
    key.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{secret}\n-----END OPENSSH PRIVATE KEY-----\n")
    line = builder(ssh_key=str(key)).machines_line()
    assert line.split(" ")[2] == str(key)
    assert secret not in line and "PRIVATE KEY" not in line
    assert secret not in nix.builders_option([builder(ssh_key=str(key))])


@pytest.mark.parametrize("ssh_key", ["id_builder", "/root/my keys/id", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl"])
def test_ssh_key_must_be_a_path_not_a_key(ssh_key: str) -> None:
    with pytest.raises(ValueError, match="absolute path of a private key file"):
        builder(ssh_key=ssh_key)


# -- reading the local facts -----------------------------------------------------------------------------------------


def test_binfmt_entries_lists_enabled_interpreters(tmp_path: Path) -> None:
    (tmp_path / "register").write_text("")
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "qemu-aarch64").write_text(
        "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"
    )
    (tmp_path / "qemu-arm").write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/arm-binfmt-P\n")
    assert nix._binfmt_entries(tmp_path) == {"qemu-aarch64": "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"}
    assert nix._binfmt_entries(tmp_path / "not-mounted") == {}


@pytest.mark.nix
def test_local_facts_follow_nix_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_CONFIG", "extra-platforms =")
    facts = nix.local_facts()
    assert facts.extra_platforms == () and facts.system == X86


# -- integration: a machine that can build aarch64 in no way ---------------------------------------------------------


@pytest.mark.nix
@needs_demo
@pytest.mark.skipif(
    not (Path("/usr/bin/unshare").exists() or Path("/bin/unshare").exists()),
    reason="needs unshare (util-linux) for a private mount namespace",
)
def test_aarch64_build_without_emulation_or_builder_fails_fast(demo_domain: Path, artifacts_dir: Path) -> None:
    doit = [sys.executable, "-m", "doit", f"domain={demo_domain}", f"artifacts={artifacts_dir}", "build:vhost-pi-sd"]
    if (BINFMT_DIR / "register").exists():
        # Only this process tree loses binfmt_misc; the machine keeps it for the tests running beside this one.
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'umount {BINFMT_DIR} && test ! -e {BINFMT_DIR}/register && exec "$@"',
            "sh",
            *doit,
        ]
    else:
        argv = doit
    proc = run(argv, timeout=60, cwd=ROOT, env={**os.environ, "NIX_CONFIG": "extra-platforms ="})
    output = proc.stdout + proc.stderr

    assert proc.returncode not in (0, None), output
    assert "TaskFailed - taskid:build:vhost-pi-sd" in output, output  # doit ran, and failed in the build
    assert "does not list aarch64-linux" in output and "no binfmt_misc interpreter for aarch64" in output, output
    assert_names_both_fixes(output)
    assert "Traceback" not in output and "internal error" not in output, output
    assert not list(artifacts_dir.glob("vhost-pi-sd/*.img"))
    if argv is not doit:
        assert (BINFMT_DIR / "register").exists()  # the machine's binfmt_misc is still there
