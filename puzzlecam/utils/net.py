"""Loopback ports for process groups started on one machine (tests, the demo, plain-python runs)."""

from __future__ import annotations

import random
import socket

# Ports the kernel hands out for bind(0) and outgoing connections; a rendezvous port picked from this range
# can be taken by another process's connection between the check and the launcher's bind.
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
_FALLBACK_EPHEMERAL_LOW = 32768
_CANDIDATES = 8000  # ports just below the ephemeral range to choose from


def _ephemeral_low() -> int:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range (so no
    other process's connection is given it before the launcher binds it)."""
    low = _ephemeral_low()
    start = max(1024, low - _CANDIDATES)
    for port in random.Random().sample(range(start, low), k=min(64, low - start)):
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # everything there is taken: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
