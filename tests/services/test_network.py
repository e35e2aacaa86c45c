"""Free ports for servers started later: drawn below the kernel's ephemeral range, never one a socket holds."""

import socket
from pathlib import Path

import pytest

from services import network


def listening_on(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def test_a_free_port_lies_below_the_ephemeral_range_and_a_server_can_bind_it():
    low = network.ephemeral_low()
    assert low == int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = network.free_port()
        assert network.LOWEST_PORT <= port < low
        listening_on(port).close()


def test_a_port_a_socket_holds_is_not_drawn(tmp_path, monkeypatch):
    # a span of two ports, the first held: every call must give the second
    held = next(p for p in range(30000, 31000, 2) if all(network.bindable(q) for q in (p, p + 1)))
    span = tmp_path / "ip_local_port_range"
    span.write_text(f"{held + 2}\t60999\n")
    monkeypatch.setattr(network, "EPHEMERAL_RANGE", span)
    monkeypatch.setattr(network, "LOWEST_PORT", held)
    with listening_on(held):
        assert {network.free_port() for _ in range(10)} == {held + 1}


@pytest.mark.parametrize("content", ["1024\t60999\n", "not numbers\n"])
def test_with_no_span_below_the_range_the_kernel_picks(tmp_path, monkeypatch, content):
    span = tmp_path / "ip_local_port_range"
    span.write_text(content)
    monkeypatch.setattr(network, "EPHEMERAL_RANGE", span)
    port = network.free_port()
    if content[0].isdigit():  # nothing lies between 20000 and 1024: the kernel's pick, from its own range
        assert port >= int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    else:  # unreadable: Linux's default range is assumed
        assert network.LOWEST_PORT <= port < 32768
    listening_on(port).close()
