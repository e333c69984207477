"""Unit tests of the pure parts: digests and the doit file checker, QEMU argv, nix helpers, published artifacts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash
from doit.dependency import Dependency, SqliteDB

from pipeline import hashing, nix, qemu
from pipeline.artifacts import atomic_write_text, publish_file, publish_log
from pipeline.domain import System
from pipeline.hashing import XXH3Checker, sha256_file, xxh3_file, xxh3_files, xxh3_text
from pipeline.qemu import Drive, Firmware, VmError, VmSpec
from pipeline.uptodate import read_saved

ROOT = Path(__file__).resolve().parent.parent


def leftovers(directory: Path) -> list[str]:
    """Temporary files an atomic write must not leave behind."""
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


# -- hashing ----------------------------------------------------------------------------------------------------------


def test_file_digests_match_the_reference_implementations(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert xxh3_file(path) == xxhash.xxh3_128(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_xxh3_text_separates_parts() -> None:
    assert xxh3_text("a", "b") == xxh3_text("a", "b")
    assert xxh3_text("ab") != xxh3_text("a", "b")
    assert xxh3_text("a", "bc") != xxh3_text("ab", "c")


def test_a_published_file_is_not_read_again_for_its_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, dest = tmp_path / "image", tmp_path / "out" / "image"
    source.write_bytes(os.urandom(1 << 16))
    dest.parent.mkdir()
    _sha, xxh3, _size = publish_file(source, dest)
    reads: list[Path] = []
    real = hashing._file_digest
    monkeypatch.setattr(hashing, "_file_digest", lambda path, digest: reads.append(path) or real(path, digest))
    assert xxh3_file(dest) == xxh3 and reads == [], "the digest taken while copying is reused"
    dest.write_bytes(b"other bytes")  # a changed file (size, mtime) is read
    assert xxh3_file(dest) == xxhash.xxh3_128(b"other bytes").hexdigest() and reads == [dest]


def test_xxh3_files_is_stable_and_content_addressed(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for base in (one, two):
        (base / "lib").mkdir(parents=True)
        (base / "flake.nix").write_text("{ outputs = _: { }; }\n")
        (base / "lib" / "host.nix").write_text("{ }\n")
    paths = [one / "flake.nix", one / "lib" / "host.nix"]
    digest = xxh3_files(paths, one)
    assert len(digest) == 32
    assert xxh3_files(reversed(paths), one) == digest, "the order files are given in does not matter"
    assert xxh3_files([two / "lib" / "host.nix", two / "flake.nix"], two) == digest, "nor where the tree lives"
    os.utime(one / "flake.nix", (1, 1))
    assert xxh3_files(paths, one) == digest, "nor mtimes"

    (two / "lib" / "host.nix").write_text("{ }\n# comment\n")
    assert xxh3_files([two / "flake.nix", two / "lib" / "host.nix"], two) != digest, "content counts"
    (two / "lib" / "host.nix").write_text("{ }\n")
    (two / "lib" / "host.nix").rename(two / "lib" / "other.nix")
    assert xxh3_files([two / "flake.nix", two / "lib" / "other.nix"], two) != digest, "names count"


def test_xxh3_checker_touch_is_not_a_change(tmp_path: Path) -> None:
    checker = XXH3Checker()
    path = tmp_path / "host.nix"
    path.write_text("{ }\n")
    state = checker.get_state(str(path), None)
    assert state is not None
    mtime, size, digest = state
    assert (size, digest) == (4, xxh3_file(path))
    assert checker.get_state(str(path), state) is None, "unchanged stat: no new state, no hashing"
    assert not checker.check_modified(str(path), os.stat(path), state)

    os.utime(path, (mtime + 100, mtime + 100))  # touch: new mtime, same bytes
    assert os.stat(path).st_mtime != mtime
    assert not checker.check_modified(str(path), os.stat(path), state)
    new_state = checker.get_state(str(path), state)
    assert new_state is not None and new_state[2] == digest, "the new mtime is remembered, the digest is the same"


def test_xxh3_checker_content_change_is_a_change(tmp_path: Path) -> None:
    checker = XXH3Checker()
    path = tmp_path / "host.nix"
    path.write_text("{ a = 1; }\n")
    state = checker.get_state(str(path), None)
    assert state is not None
    path.write_text("{ a = 2; }\n")  # same size, different bytes
    os.utime(path, (state[0] + 1, state[0] + 1))
    assert os.stat(path).st_size == state[1]
    assert checker.check_modified(str(path), os.stat(path), state)
    path.write_text("{ a = 10; }\n")  # a different size is decided without hashing
    assert checker.check_modified(str(path), os.stat(path), state)


def test_xxh3_checker_in_real_doit(tmp_path: Path) -> None:
    """doit with our checker: touching a file_dep re-runs nothing; changing its content re-runs the task."""
    (tmp_path / "input.txt").write_text("hello\n")
    (tmp_path / "dodo.py").write_text(
        textwrap.dedent("""\
        from pipeline.hashing import XXH3Checker

        DOIT_CONFIG = {"check_file_uptodate": XXH3Checker, "dep_file": "state.db", "verbosity": 0}

        def task_copy():
            return {"actions": ["cp input.txt output.txt"], "file_dep": ["input.txt"], "targets": ["output.txt"]}
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def doit() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "doit"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert ".  copy" in doit()
    assert "-- copy" in doit()
    stat = os.stat(tmp_path / "input.txt")
    os.utime(tmp_path / "input.txt", (stat.st_atime + 60, stat.st_mtime + 60))
    assert "-- copy" in doit(), "a touch alone must not re-run the task"
    (tmp_path / "input.txt").write_text("HELLO\n")
    assert ".  copy" in doit(), "a content change must re-run it"
    assert (tmp_path / "output.txt").read_text() == "HELLO\n"


def test_read_saved_fills_doits_cache_as_its_own_reads_would(tmp_path: Path) -> None:
    """One scan of a key range gives each task what doit's one-query-a-task read gives it, nothing outside the range,
    {} for a task without a row, and leaves a row this run already holds alone."""
    db = str(tmp_path / "doit.sqlite3")
    first = Dependency(SqliteDB, db, checker_cls=XXH3Checker)
    for i in range(100):
        first._set(f"eval:h{i}", "_values_:", {"toplevel": f"/nix/store/{i}.drv"})
    first._set("evaluate", "_values_:", {"not": "eval:"})
    first._set("build:h0-iso", "_values_:", {"xxh3": "0"})
    first.close()

    names = [f"eval:h{i}" for i in range(90)] + ["eval:gone"]
    dep = Dependency(SqliteDB, db, checker_cls=XXH3Checker)
    dep._set("eval:h1", "_values_:", {"toplevel": "this run's"})
    read_saved(dep.backend, "eval:", names)
    own = Dependency(SqliteDB, db, checker_cls=XXH3Checker).backend
    assert {n: dep.backend._cache[n] for n in names if n != "eval:h1"} == {
        n: own._get_task_data(n) for n in names if n != "eval:h1"
    }
    assert dep.backend._cache["eval:gone"] == {}
    assert dep.backend._cache["eval:h1"] == {"_values_:": {"toplevel": "this run's"}}
    assert set(dep.backend._cache) == set(names), "rows outside the names (eval:h95, evaluate, build:…) stay unread"


# -- qemu argv --------------------------------------------------------------------------------------------------------


def opt(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in an argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_vmspec_argv_iso_bios(tmp_path: Path) -> None:
    iso = tmp_path / "nixos.iso"
    spec = VmSpec(
        name="vhost-dev-iso-boot",
        system=System.x86_64_linux,
        workdir=tmp_path / "vm",
        console_log=tmp_path / "vm" / "console.log",
        memory_mib=1024,
        cpus=2,
        drives=(Drive(iso, media="cdrom"),),
        boot_order="d",
    )
    argv = spec.argv()
    assert all(isinstance(a, str) for a in argv)
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-name") == ["vhost-dev-iso-boot"]
    assert opt(argv, "-m") == ["1024"] and opt(argv, "-smp") == ["2"]
    assert opt(argv, "-machine") == ["pc,accel=tcg"]
    assert "-cpu" not in argv and "-bios" not in argv
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert opt(argv, "-drive") == [f"if=none,id=drive0,file={iso},format=raw,media=cdrom,readonly=on"]
    assert "ide-cd,drive=drive0,bus=ide.1" in opt(argv, "-device")
    assert opt(argv, "-boot") == ["order=d,menu=off,strict=on"], "no SeaBIOS boot menu wait, no fallback devices"
    assert "virtio-net-pci,netdev=net0,romfile=" in opt(argv, "-device"), "no iPXE option ROM to load"
    (chardev,) = opt(argv, "-chardev")
    assert f"path={spec.console_socket}" in chardev and "server=on,wait=off" in chardev
    assert f"logfile={spec.console_log}" in chardev, "the whole console goes to the log"
    assert opt(argv, "-serial") == ["chardev:console"]
    assert opt(argv, "-qmp") == [f"unix:{tmp_path / 'vm' / 'qmp.sock'},server=on,wait=off"]
    assert opt(argv, "-netdev") == ["user,id=net0"]


def test_vmspec_argv_kvm_uses_host_cpu(tmp_path: Path) -> None:
    spec = VmSpec(name="k", system=System.x86_64_linux, workdir=tmp_path, console_log=tmp_path / "log", accel="kvm")
    argv = spec.argv()
    assert opt(argv, "-machine") == ["pc,accel=kvm"]
    assert opt(argv, "-cpu") == ["host"]


def test_vmspec_argv_sd_uboot(tmp_path: Path) -> None:
    img = tmp_path / "nixos-sd.img"
    spec = VmSpec(
        name="vhost-pi-sd-boot",
        system=System.aarch64_linux,
        workdir=tmp_path / "vm",
        console_log=tmp_path / "console.log",
        firmware=Firmware.uboot,
        drives=(Drive(img, snapshot=True),),
    )
    argv = spec.argv()
    assert argv[0] == "qemu-system-aarch64"
    assert opt(argv, "-machine") == ["virt,accel=tcg"]
    assert opt(argv, "-cpu") == ["cortex-a57"]
    assert opt(argv, "-bios") == [str(qemu.UBOOT_ARM64)]
    assert opt(argv, "-drive") == [f"if=none,id=drive0,file={img},format=raw,snapshot=on"]
    assert "virtio-blk-pci,drive=drive0" in opt(argv, "-device")
    assert "-boot" not in argv, "-boot order is an x86 thing"
    assert Firmware.uboot.files() == [str(qemu.UBOOT_ARM64)]


def test_vmspec_argv_uefi_pflash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "OVMF_CODE_4M.fd"
    code.write_bytes(b"\0" * 16)
    monkeypatch.setattr(qemu, "OVMF_CODE", [tmp_path / "missing.fd", code])
    disk = tmp_path / "disk.raw"
    spec = VmSpec(
        name="vhost-dev-disk",
        system=System.x86_64_linux,
        workdir=tmp_path / "vm",
        console_log=tmp_path / "console.log",
        firmware=Firmware.uefi,
        drives=(Drive(disk, serial="cim-main"),),
        boot_order="c",
    )
    argv = spec.argv()
    drives = opt(argv, "-drive")
    assert drives[0] == f"if=pflash,format=raw,unit=0,readonly=on,file={code}", "the first existing OVMF_CODE"
    assert drives[1] == f"if=pflash,format=raw,unit=1,file={spec.ovmf_vars}", "a per-VM copy of the variables"
    assert spec.ovmf_vars.parent == spec.workdir
    assert drives[2] == f"if=none,id=drive0,file={disk},format=raw"
    assert "virtio-blk-pci,drive=drive0,serial=cim-main" in opt(argv, "-device")
    assert opt(argv, "-boot") == ["order=c"]
    assert "-bios" not in argv


def test_uefi_without_ovmf_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "OVMF_CODE", [tmp_path / "missing.fd"])
    spec = VmSpec(
        name="u", system=System.x86_64_linux, workdir=tmp_path, console_log=tmp_path / "log", firmware=Firmware.uefi
    )
    with pytest.raises(VmError, match="install ovmf"):
        spec.argv()


def test_vmspec_argv_port_forwards(tmp_path: Path) -> None:
    spec = VmSpec(
        name="p",
        system=System.aarch64_linux,
        workdir=tmp_path,
        console_log=tmp_path / "log",
        port_forwards=(
            qemu.Forward("tcp", 4222, "10.23.0.12"),
            qemu.Forward("udp", 53, "10.23.0.11"),
            qemu.Forward("tcp", 22, host_port=40022),
        ),
    )
    argv = spec.argv()
    # Port 0: QEMU binds a free port itself (no race between parallel VMs); guests are addressed behind the NIC.
    assert opt(argv, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:0-10.23.0.12:4222,"
        "hostfwd=udp:127.0.0.1:0-10.23.0.11:53,hostfwd=tcp:127.0.0.1:40022-:22"
    ]
    assert "virtio-net-pci,netdev=net0,romfile=" in opt(argv, "-device")


def test_usernet_ports_are_read_back() -> None:
    text = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  13       127.0.0.1 35695      10.23.0.12  4222     0     0
  UDP[HOST_FORWARD]  14       127.0.0.1 40001      10.23.0.11    53     0     0
  TCP[HOST_FORWARD]  15       127.0.0.1 40022       10.0.2.15    22     0     0
"""
    ports = qemu.parse_usernet(text)
    assert ports == {
        ("tcp", "10.23.0.12", 4222): 35695,
        ("udp", "10.23.0.11", 53): 40001,
        ("tcp", "10.0.2.15", 22): 40022,
    }
    assert qemu.Forward("tcp", 22).key in ports


def test_vmspec_argv_several_drives_and_extra(tmp_path: Path) -> None:
    spec = VmSpec(
        name="i",
        system=System.x86_64_linux,
        workdir=tmp_path,
        console_log=tmp_path / "log",
        drives=(Drive(tmp_path / "a.iso", media="cdrom"), Drive(tmp_path / "b.raw", format="qcow2")),
        extra=("-rtc", "base=utc"),
    )
    argv = spec.argv()
    assert [d.split(",")[1] for d in opt(argv, "-drive")] == ["id=drive0", "id=drive1"]
    assert "format=qcow2" in opt(argv, "-drive")[1]
    assert argv[-2:] == ["-rtc", "base=utc"]


def test_free_port_is_bindable() -> None:
    import socket

    port = qemu.free_port()
    assert 1024 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- nix pure helpers -------------------------------------------------------------------------------------------------


def fake_out(tmp_path: Path, products: str | None) -> Path:
    out = tmp_path / "out"
    (out / "nix-support").mkdir(parents=True)
    if products is not None:
        (out / "nix-support" / "hydra-build-products").write_text(products)
    return out


def test_hydra_product_finds_the_image(tmp_path: Path) -> None:
    out = fake_out(
        tmp_path,
        textwrap.dedent(f"""\
        doc manual {tmp_path}/out/share/doc
        file iso {tmp_path}/out/iso/nixos-vhost-dev-x86_64-linux.iso
        file sd-image {tmp_path}/out/sd-image/nixos-sd-image.img
        """),
    )
    assert nix.hydra_product(out, "iso") == out / "iso" / "nixos-vhost-dev-x86_64-linux.iso"
    assert nix.hydra_product(out, "sd-image") == out / "sd-image" / "nixos-sd-image.img"


def test_hydra_product_missing_type(tmp_path: Path) -> None:
    out = fake_out(tmp_path, "file iso /x.iso\n\nfile\n")
    with pytest.raises(nix.NixError, match=r"hydra-build-products lists no 'file sd-image …' product"):
        nix.hydra_product(out, "sd-image")


def test_hydra_product_missing_file(tmp_path: Path) -> None:
    out = fake_out(tmp_path, None)
    with pytest.raises(nix.NixError, match="has no nix-support/hydra-build-products") as info:
        nix.hydra_product(out, "iso")
    assert str(out) in str(info.value)


@pytest.mark.parametrize(
    ("ver", "expected"),
    [
        ((2, 8, 0), "/nix/store/abc-x.drv"),
        ((2, 12, 1), "/nix/store/abc-x.drv"),
        ((2, 13, 0), "/nix/store/abc-x.drv^out"),
        ((2, 24, 10), "/nix/store/abc-x.drv^out"),
    ],
)
def test_output_installable(monkeypatch: pytest.MonkeyPatch, ver: tuple[int, ...], expected: str) -> None:
    monkeypatch.setattr(nix, "version", lambda: ver)
    assert nix.output_installable("/nix/store/abc-x.drv") == expected


def test_output_installable_names_other_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nix, "version", lambda: (2, 18, 0))
    assert nix.output_installable("/nix/store/abc-x.drv", "dev") == "/nix/store/abc-x.drv^dev"


def test_flake_ref_is_a_path_ref(tmp_path: Path) -> None:
    assert nix.flake_ref(tmp_path / "." / "demo") == f"path:{(tmp_path / 'demo').resolve()}"


def test_nix_error_carries_the_stderr_tail() -> None:
    stderr = "\n".join(f"line {i}" for i in range(40))
    error = nix.NixError("nix build /nix/store/x.drv failed (exit 1).", stderr, hint="Try again.")
    assert str(error) == "nix build /nix/store/x.drv failed (exit 1).", "str() is the message alone"
    text = error.report()
    assert text.startswith("nix build /nix/store/x.drv failed (exit 1). Try again.\nnix said:\n")
    assert text.endswith("line 39") and "line 25" in text and "line 24" not in text
    assert error.stderr == stderr


# -- artifacts --------------------------------------------------------------------------------------------------------


def test_publish_file_hashes_while_copying(tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 3)
    source = tmp_path / "store" / "image.iso"
    source.parent.mkdir()
    source.write_bytes(data)
    source.chmod(0o444)  # as in the Nix store
    dest = tmp_path / "artifacts" / "vhost-dev-iso" / "image.iso"
    sha, xxh, size = publish_file(source, dest)
    assert (sha, xxh, size) == (hashlib.sha256(data).hexdigest(), xxhash.xxh3_128(data).hexdigest(), len(data))
    assert dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o644, "a published file is writable by its owner, unlike the store's"
    assert leftovers(tmp_path / "artifacts") == []


def test_publish_file_replaces_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "image.iso"
    (tmp_path / "old").write_bytes(b"old image")
    (tmp_path / "new").write_bytes(b"new image, longer")
    publish_file(tmp_path / "old", dest)
    with dest.open("rb") as reader:  # a reader of the old file (a VM, a download) keeps seeing whole old bytes
        publish_file(tmp_path / "new", dest)
        assert reader.read() == b"old image"
    assert dest.read_bytes() == b"new image, longer"
    assert leftovers(tmp_path / "a") == []


def test_publish_file_failure_keeps_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "image.iso"
    (tmp_path / "old").write_bytes(b"old image")
    publish_file(tmp_path / "old", dest)
    with pytest.raises(FileNotFoundError):
        publish_file(tmp_path / "missing", dest)
    assert dest.read_bytes() == b"old image"
    assert leftovers(tmp_path / "a") == []


def test_publish_log_and_atomic_write_text(tmp_path: Path) -> None:
    publish_log(tmp_path / "no-such-console.log", tmp_path / "a" / "boot.log")
    assert "printed nothing" in (tmp_path / "a" / "boot.log").read_text()
    (tmp_path / "console.log").write_bytes(b"Linux version 6.1\r\ncim: vhost-dev boot complete\r\n")
    publish_log(tmp_path / "console.log", tmp_path / "a" / "boot.log")
    assert (tmp_path / "a" / "boot.log").read_bytes() == (tmp_path / "console.log").read_bytes()
    atomic_write_text(tmp_path / "b" / "x.json", "{}\n")
    assert (tmp_path / "b" / "x.json").read_text() == "{}\n"
    assert leftovers(tmp_path) == []


# -- processes --------------------------------------------------------------------------------------------------------


def test_a_program_started_in_a_daemon_thread_dies_with_the_interpreter() -> None:
    """doit's workers are daemon threads: their `with` blocks never finish on ^C, so exit must end their programs."""
    script = textwrap.dedent("""
        import sys, threading, time
        from pipeline.process import spawn

        def worker():
            with spawn(["sleep", "300"]) as proc:
                print(proc.pid, flush=True)
                time.sleep(300)

        threading.Thread(target=worker, daemon=True).start()
        time.sleep(1)
        sys.exit(0)  # the main thread leaves while the worker is inside its with block
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split()[0])
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError(f"sleep (pid {pid}) outlived the interpreter that started it")


def test_host_names_go_to_nix_eval_in_arguments_linux_accepts() -> None:
    hosts = [f"host-{i:05d}" for i in range(20_000)]
    chunks = list(nix.argument_chunks(hosts))
    assert [h for c in chunks for h in c] == hosts and len(chunks) > 1
    assert all(len(nix.batch_apply(c).encode()) < 128 * 1024 for c in chunks)
    assert list(nix.argument_chunks([])) == [] and list(nix.argument_chunks(["a"])) == [["a"]]
