"""Robustness of the mechanisms, with real processes, real locks and real file systems (no VM, no nix):
children die with their parent, a signal ends a threaded run cleanly, a killed writer leaves no half file, a full or
read-only directory gives one clear message, one run per artifacts directory, any domain.json a clean error."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cimtest.demo import DEMO, ROOT
from cimtest.procs import cmdline, descendants, survivors, wait_for, wait_for_output

from pipeline import process, reaper
from pipeline.artifacts import ArtifactError, atomic_file, publish_file, sweep_temps
from pipeline.context import READ_ONLY_COMMANDS, doit_command
from pipeline.runlock import RunLock, RunLockError, lock_path, parse_wait

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs or a read-only bind needs root")


def python(script: str, tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """A Python child running `script` (with the project importable), output in tmp_path/out.txt."""
    out = (tmp_path / "out.txt").open("wb")
    return process.start(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=out,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )


# -- children die with the pipeline ---------------------------------------------------------------------------------


def test_children_die_with_a_killed_parent_even_from_a_worker_thread(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the kernel's parent-death signal (setpriv) takes the children along."""
    parent = python(
        """
        import threading, time
        from pipeline import process, reaper
        def work():  # a doit -n worker thread starting a long child (as a QEMU)
            process.start(["sleep", "3600"])
            print("started", flush=True)
            time.sleep(3600)
        threading.Thread(target=work, daemon=True).start()
        time.sleep(3600)
    """,
        tmp_path,
    )
    try:
        wait_for_output(tmp_path / "out.txt", "started", 30)
        children = descendants(parent.pid)
        assert any("sleep 3600" in line for line in survivors(children).values()), children
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not survivors(children), "the children's death", 5)
    finally:
        process.kill_group(parent)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_every_child_and_waits_for_cleanup(tmp_path: Path, signum: int) -> None:
    """As under `doit -n`: the work runs in a thread that never sees KeyboardInterrupt; the handler stops its child,
    lets it finish its cleanup (here: writing a log), then ends the process with 128+signal."""
    parent = python(
        """
        import pathlib, subprocess, sys, threading, time
        from pipeline import process, reaper
        process.stop_on_signals()
        def work():
            with process.busy():
                try:
                    with process.spawn(["sleep", "3600"]) as child:
                        print("started", flush=True)
                        child.wait()
                finally:
                    time.sleep(0.5)  # publishing a console log takes a moment
                    pathlib.Path("cleanup-done").write_text(str(process.stopping()))
        threading.Thread(target=work, daemon=True).start()
        time.sleep(3600)
    """,
        tmp_path,
    )
    try:
        wait_for_output(tmp_path / "out.txt", "started", 30)
        children = descendants(parent.pid)
        os.kill(parent.pid, signum)
        assert parent.wait(20) == 128 + signum
        assert not survivors(children)
        assert (tmp_path / "cleanup-done").read_text() == str(signum), "the worker's cleanup ran before the exit"
        err = (tmp_path / "out.txt").read_text()
        assert f"{signal.Signals(signum).name}: stopped 1 process group(s)" in err and "Traceback" not in err
    finally:
        process.kill_group(parent)


def test_no_child_starts_once_the_run_is_stopping(tmp_path: Path) -> None:
    parent = python(
        """
        import os, signal, sys
        from pipeline import process, reaper
        process.stop_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except SystemExit as exc:
            code = exc.code
        try:
            process.run(["true"], timeout=10)
        except process.Interrupted as exc:
            print("refused:", exc.report(), flush=True)
        sys.exit(code)
    """,
        tmp_path,
    )
    assert parent.wait(30) == 128 + signal.SIGTERM
    assert "refused: the run was interrupted by SIGTERM" in (tmp_path / "out.txt").read_text()


def test_a_missing_program_is_still_file_not_found() -> None:
    with pytest.raises(FileNotFoundError):
        process.run(["cim-no-such-program"], timeout=10)


# -- nix runs through the reaper --------------------------------------------------------------------------------------
# Real nix is in test_robust.py; here a shell named nix-* plays the part that matters: a grandchild in a session of
# its own that ignores SIGTERM, as a sandboxed builder is (setsid, out of reach of any process-group signal).


def stubborn(tag: str) -> str:
    """A shell command: start a child in a session of its own that ignores SIGTERM (its command line names `tag`)."""
    return f"setsid sh -c 'trap \"\" TERM HUP INT; sleep 3601; : {tag}' & echo started"


def running(tag: str) -> list[int]:
    """The stubborn children of `stubborn(tag)` still running."""
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if cmdline(pid).endswith(f": {tag}")]


def kill_stubborn(tag: str) -> None:
    """A failed test's clean-up: the stubborn children ignore SIGTERM."""
    for pid in running(tag):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def nix_named_shell(tmp_path: Path) -> str:
    link = tmp_path / "nix-sh"
    link.symlink_to(shutil.which("sh") or "/bin/sh")
    assert process.is_nix(str(link))
    return str(link)


def test_a_reaper_ends_before_the_pipeline_would_kill_it() -> None:
    """The pipeline SIGKILLs a group STOP_GRACE (or, at exit, LEFTOVER_GRACE) seconds after its SIGTERM: a reaper
    killed then would orphan the builders it is there to stop."""
    assert min(process.STOP_GRACE, process.LEFTOVER_GRACE) > reaper.NIX_GRACE + reaper.KILL_GRACE


def test_nix_keeps_its_output_and_exit_status_through_the_reaper(tmp_path: Path) -> None:
    sh = nix_named_shell(tmp_path)
    done = process.run(
        [sh, "-c", "echo out; echo err >&2; echo scratch > $TMPDIR/file; echo $TMPDIR; exit 7"], timeout=30
    )
    out, scratch = done.stdout.splitlines()
    assert (done.returncode, out, done.stderr) == (7, "out", "err\n")
    assert Path(scratch).name.startswith("cim-nix-") and not Path(scratch).exists(), "nix's TMPDIR is removed"
    assert process.run([sh, "-c", "kill -TERM $$"], timeout=30).returncode == -signal.SIGTERM


def test_what_nix_leaves_behind_ends_with_it(tmp_path: Path) -> None:
    """nix ends (here: exits at once) while its setsid'd child runs on: the reaper, a subreaper, kills the orphan."""
    sh = nix_named_shell(tmp_path)
    tag = f"{tmp_path}/orphan"
    try:
        done = process.run([sh, "-c", stubborn(tag)], timeout=30)
        assert done.returncode == 0 and done.stdout == "started\n"
        wait_for(lambda: not running(tag), "the orphan's death", 5)
    finally:
        kill_stubborn(tag)


@pytest.mark.parametrize("kill", ["parent", "nix"])
def test_nix_children_die_when_the_run_or_nix_is_killed(tmp_path: Path, kill: str) -> None:
    """SIGKILL of the pipeline (the reaper's death signal stops nix and sweeps) or of nix alone (the orphan is
    re-parented to the reaper, which sweeps it): either way nothing is left within 5 s."""
    sh = nix_named_shell(tmp_path)
    tag = f"{tmp_path}/builder"
    parent = python(
        f"""
        import time
        from pipeline import process, reaper
        print(process.run([{sh!r}, "-c", {stubborn(tag) + "; sleep 3600"!r}], timeout=3600), flush=True)
        time.sleep(3600)
    """,
        tmp_path,
    )
    try:
        wait_for(
            lambda: running(tag) and any(line == "sleep 3601" for line in survivors(descendants(parent.pid)).values()),
            "nix and its stubborn child",
            30,
        )
        tree = descendants(parent.pid)
        os.kill(
            parent.pid
            if kill == "parent"
            else next(pid for pid, line in survivors(tree).items() if line.startswith(sh)),
            signal.SIGKILL,
        )
        wait_for(lambda: not survivors(tree), "every child's death", 5)
        assert not running(tag)
    finally:
        process.kill_group(parent)
        kill_stubborn(tag)


# -- atomic publishing -------------------------------------------------------------------------------------------------


def test_a_writer_killed_mid_file_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "artifacts" / "a" / "image.iso"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old image")
    writer = python(
        """
        import sys, time
        from pathlib import Path
        from pipeline.artifacts import atomic_file
        with atomic_file(Path(sys.argv[1])) as out:
            out.write(b"x" * (1 << 20))
            print("half written", flush=True)
            time.sleep(3600)
    """,
        tmp_path,
        str(dest),
    )
    try:
        wait_for_output(tmp_path / "out.txt", "half written", 30)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(10)
    finally:
        process.kill_group(writer)
    assert dest.read_bytes() == b"old image"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["image.iso"], "no temporary file, named or not"


def test_named_temporaries_a_killed_run_left_are_swept(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    left = [tmp_path / ".manifest.json.4242.4243.tmp", tmp_path / "a" / ".image.iso.4242.tmp"]
    for path in left:
        path.write_bytes(b"half")
    (tmp_path / "a" / ".hidden-but-not-ours").write_text("stays")
    assert sorted(sweep_temps(tmp_path)) == sorted(left)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [".hidden-but-not-ours"]


@contextlib.contextmanager
def mounted(target: Path, *argv: str) -> Iterator[Path]:
    """`mount ARGV… target`, unmounted (lazily, whatever holds it) on the way out."""
    target.mkdir(parents=True, exist_ok=True)
    proc = process.run(["mount", *argv, str(target)], timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        process.run(["umount", "-l", str(target)], timeout=30)


@needs_root
def test_a_full_disk_fails_with_one_message_and_keeps_the_old_file(tmp_path: Path) -> None:
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as small:
        dest = small / "vhost-dev-iso" / "image.iso"
        dest.parent.mkdir()
        dest.write_bytes(b"old image")
        big = tmp_path / "big.iso"
        big.write_bytes(os.urandom(2 << 20))
        with pytest.raises(ArtifactError) as caught:
            publish_file(big, dest)
        message = caught.value.report()
        assert f"cannot write {dest}: No space left on device" in message
        assert "unchanged" in message and "df -h" in message and "\n" not in message
        assert dest.read_bytes() == b"old image"
        assert sorted(p.name for p in dest.parent.iterdir()) == ["image.iso"]
        # Space again: the same publish completes.
        dest.unlink()
        small_file = tmp_path / "small.iso"
        small_file.write_bytes(b"new image")
        publish_file(small_file, dest)
        assert dest.read_bytes() == b"new image"


@needs_root
def test_a_read_only_directory_fails_with_one_message(tmp_path: Path) -> None:
    target = tmp_path / "ro"
    (target / "vhost-dev-iso").mkdir(parents=True)
    (target / "vhost-dev-iso" / "image.iso").write_bytes(b"old image")
    with mounted(target, "--bind", str(target)):
        proc = process.run(["mount", "-o", "remount,bind,ro", str(target)], timeout=30)
        assert proc.returncode == 0, proc.stderr
        for dest in (target / "vhost-dev-iso" / "image.iso", target / "new-artifact" / "image.iso"):
            with pytest.raises(ArtifactError) as caught, atomic_file(dest) as out:
                out.write(b"new image")
            assert f"cannot write {dest}: Read-only file system" in caught.value.report()
        assert (target / "vhost-dev-iso" / "image.iso").read_bytes() == b"old image"


def test_write_errors_name_the_fix() -> None:
    from pipeline.artifacts import write_error

    for code, needle in [(errno.ENOSPC, "Free space"), (errno.EACCES, "writable"), (errno.EIO, "Fix that path")]:
        error = write_error(Path("/a/b.iso"), OSError(code, os.strerror(code)))
        assert str(error).startswith(f"cannot write /a/b.iso: {os.strerror(code)}.") and needle in error.hint


# -- one run per artifacts directory -----------------------------------------------------------------------------------


def test_which_doit_commands_lock() -> None:
    assert doit_command(["domain=configs/demo"]) == "run"
    assert doit_command(["domain=x", "boot:vhost-dev-iso", "-n", "2"]) == "run"
    assert doit_command(["-f", "dodo.py", "list", "--all"]) == "list"
    assert doit_command(["info", "release"]) == "info"
    assert doit_command(["forget", "boot"]) == "forget"
    assert {"list", "info", "help"} <= READ_ONLY_COMMANDS and "forget" not in READ_ONLY_COMMANDS


def test_wait_values() -> None:
    assert parse_wait(None) == parse_wait("yes") > 3600
    assert parse_wait("no") == parse_wait("0") == 0
    assert parse_wait("30") == 30
    with pytest.raises(RunLockError, match="neither 'no' nor a number"):
        parse_wait("soon")


def holder(tmp_path: Path, domain: Path, artifacts: Path) -> subprocess.Popen[bytes]:
    """Another process holding the run lock until killed."""
    proc = python(
        """
        import sys, time
        from pathlib import Path
        from pipeline.runlock import RunLock
        lock = RunLock(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
        lock.acquire(0)
        print("holding", flush=True)
        time.sleep(3600)
    """,
        tmp_path,
        str(tmp_path),
        str(domain),
        str(artifacts),
    )
    wait_for_output(tmp_path / "out.txt", "holding", 30)
    return proc


def test_a_second_run_waits_or_refuses_naming_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    domain, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    domain.mkdir()
    first = holder(tmp_path, domain, artifacts)
    try:
        with pytest.raises(RunLockError) as refused:
            RunLock(tmp_path, domain, artifacts).acquire(0)
        assert f"run {first.pid} (domain {domain}" in str(refused.value) and "wait=no" in str(refused.value)
        with pytest.raises(RunLockError, match="still holds"):
            RunLock(tmp_path, domain, artifacts).acquire(1)
        assert f"waiting for run {first.pid}" in capsys.readouterr().out
        # Another artifacts directory (so another state) is not held up.
        other = RunLock(tmp_path, domain, tmp_path / "elsewhere")
        other.acquire(0)
        other.release()
    finally:
        process.kill_group(first)
    second = RunLock(tmp_path, domain, artifacts)
    second.acquire(5)  # the kernel dropped the killed holder's lock
    second.release()


def test_a_run_that_has_just_taken_the_lock_is_still_named(tmp_path: Path) -> None:
    """Between a run's flock and the line that says who it is, the lock file is empty or names the run before (here:
    PID 1 is alive, so a dead PID is used): a second run waits for the introduction rather than say "another run"."""
    domain, artifacts = tmp_path / "demo", tmp_path / "artifacts"
    domain.mkdir()
    path = lock_path(tmp_path, artifacts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 2**22 + 1, "domain_dir": str(domain), "started": "earlier"}))  # > pid_max
    first = python(
        """
        import fcntl, json, os, sys, time
        with open(sys.argv[1], "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(0.8)  # a slow introduction
            lock.seek(0), lock.truncate()
            lock.write(json.dumps({"pid": os.getpid(), "domain_dir": sys.argv[2], "started": "now"}))
            lock.flush()
            time.sleep(3600)
    """,
        tmp_path,
        str(path),
        str(domain),
    )
    try:
        wait_for_output(tmp_path / "out.txt", "locked", 30)
        with pytest.raises(RunLockError) as refused:
            RunLock(tmp_path, domain, artifacts).acquire(0)
        assert f"run {first.pid} (domain {domain}" in str(refused.value)
    finally:
        process.kill_group(first)


def test_another_domain_is_refused_an_artifacts_directory(tmp_path: Path) -> None:
    demo, other, artifacts = tmp_path / "demo", tmp_path / "other", tmp_path / "artifacts"
    demo.mkdir(), other.mkdir(), artifacts.mkdir()
    first = holder(tmp_path, demo, artifacts)
    try:  # while the demo runs: refused at once, not after waiting
        with pytest.raises(RunLockError) as busy:
            RunLock(tmp_path, other, artifacts).acquire(3600)
        assert f"holds the release of another domain ({demo})" in str(busy.value)
    finally:
        process.kill_group(first)
    manifest = json.loads((DEMO / "domain.json").read_text())  # any valid manifest naming the demo as its domain
    (artifacts / "manifest.json").write_text(
        json.dumps(
            {
                "domain": manifest["name"],
                "fqdn": manifest["fqdn"],
                "domain_dir": str(demo),
                "generated": "2026-12-04T00:00:00Z",
                "artifacts": {},
            }
        )
    )
    with pytest.raises(RunLockError) as claimed:
        RunLock(tmp_path, other, artifacts).acquire(0)
    assert f"{artifacts} holds the release of another domain ({demo}); this run is for {other}" in str(claimed.value)
    assert "remove its manifest.json" in claimed.value.hint
    RunLock(tmp_path, demo, artifacts).acquire(0)


# -- any domain.json: one paragraph ------------------------------------------------------------------------------------


def _nested(path: Path) -> None:
    path.write_text("[" * 10_000 + "]" * 10_000)


def _deep_object(path: Path) -> None:
    path.write_text('{"a":' * 10_000 + "1" + "}" * 10_000)


def _random(path: Path) -> None:
    with path.open("wb") as f:
        for _ in range(50):
            f.write(os.urandom(1 << 20))


def _random_small(path: Path) -> None:
    path.write_bytes(bytes(b | 0x80 for b in os.urandom(4096)))  # no NUL, not UTF-8


def _huge_json(path: Path) -> None:
    data = json.loads((DEMO / "domain.json").read_text())
    data["hosts"].update({f"h{i}": data["hosts"]["vhost-pi"] for i in range(100_000)})
    path.write_text(json.dumps(data))


HOSTILE = {
    "nested-10000": (_nested, "nested too deeply"),
    "deep-object": (_deep_object, "nested too deeply"),
    "random-50MB": (_random, "larger than 4 MiB"),
    "random-not-utf8": (_random_small, "not UTF-8 text"),
    "huge-valid-json": (_huge_json, "larger than 4 MiB"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_any_domain_json_is_one_paragraph(tmp_path: Path, case: str) -> None:
    domain = tmp_path / "demo"
    shutil.copytree(DEMO, domain, ignore=shutil.ignore_patterns("result*"))
    make, needle = HOSTILE[case]
    make(domain / "domain.json")
    artifacts = tmp_path / "artifacts"
    # The 5 s deadline is the bound for a clean error (a ProcessTimeout here fails the test).
    for argv in (
        [sys.executable, "-m", "doit", f"domain={domain}", f"artifacts={artifacts}"],
        [sys.executable, "-m", "pipeline.cli", "validate", str(domain)],
    ):
        proc = process.run(argv, timeout=5, cwd=ROOT)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = proc.stderr.strip()
        assert err.startswith(f"error: {domain / 'domain.json'}: ") and needle in err, err
        assert "\n" not in err and "Traceback" not in err
    assert not artifacts.exists()
