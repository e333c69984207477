"""pytest plugin: free ports on 127.0.0.1, for servers a test starts (VM forwards pick theirs in pipeline.qemu)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago; a server that fails to bind it should retry."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    return free_tcp_port
