"""
Ports for the servers a process starts: free TCP ports that stay free until the server binds them.

A port the kernel picks (bind to port 0) comes from its ephemeral range, the one it also gives every
outgoing connection: in the seconds before a server started later binds it (Ray's HAProxy once the cluster
is up, a subprocess once it has imported its libraries), a connection made meanwhile can take it and the
server fails with "Address already in use". So ports are drawn at random below that range, and above the
ports Ray gives its workers (10002-19999 by default).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux; macOS's range starts at 49152
LOWEST_PORT = 20000
ATTEMPTS = 100


def free_port() -> int:
    """A TCP port no socket holds on any interface now, drawn at random between LOWEST_PORT and the ephemeral
    range (the kernel's pick if that span is empty or every draw is taken)."""
    below = ephemeral_low()
    draw = random.SystemRandom()
    for _ in range(ATTEMPTS if below > LOWEST_PORT else 0):
        port = draw.randrange(LOWEST_PORT, below)
        if bindable(port):
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int, reuse_address: bool = False) -> bool:
    """Whether a server could bind port on every interface now. reuse_address: as a server that sets
    SO_REUSEADDR (most do) binds it, past connections of an earlier server there still closing."""
    with socket.socket() as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
