"""pytest plugin: a private sshd on 127.0.0.1 and throw-away SSH keys (the remote-builder tests use them)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cimtest.ports import free_tcp_port
from pipeline.process import run, spawn

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path


def checked(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = run(argv, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair at `path` (and `path`.pub), without a passphrase."""
    checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


@contextlib.contextmanager
def run_sshd(workdir: Path, host_key: Path, client_pub: Path, login: Path, deadline: float = 15.0) -> Iterator[int]:
    """sshd on a free 127.0.0.1 port, admitting `client_pub` as root and forcing `login`; yields the port.

    It runs as PID 1 of its own PID namespace, so stopping it ends every session it started as well (sshd puts each
    session in a new session of its own, out of reach of a process-group kill).
    """
    (workdir / "authorized_keys").write_text(f"restrict {client_pub.read_text().strip()}\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's privilege-separation directory
    log = workdir / "sshd.log"
    for _attempt in range(5):  # the port is free when chosen; another process may take it before sshd binds
        port = free_tcp_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1:{port}\nHostKey {host_key}\nAuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            f"ForceCommand {login}\nPidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
        with (
            log.open("wb") as out,
            spawn(
                ["unshare", "--pid", "--fork", "--kill-child", SSHD, "-D", "-e", "-f", str(config)], stdout=out
            ) as proc,
        ):
            until = time.monotonic() + deadline
            while proc.poll() is None and time.monotonic() < until:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(0.1)
            else:
                if proc.poll() is None:
                    raise AssertionError(f"sshd did not listen on {port} within {deadline} s:\n{log.read_text()}")
                continue  # sshd exited (port taken): try another port
            yield port
            return
    raise AssertionError(f"sshd would not start:\n{log.read_text()}")


@pytest.fixture
def sshd() -> Callable[..., contextlib.AbstractContextManager[int]]:
    """`with sshd(workdir, host_key, client_pub, login) as port:` a private sshd (see `run_sshd`)."""
    return run_sshd
