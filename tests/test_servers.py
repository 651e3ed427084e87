"""The test servers themselves: a port lost to a race before redis-server listens is not a failed run."""

from __future__ import annotations

import socket

import pytest

from tests.servers import PortTaken, RedisServer, free_cluster_port, running


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(64)


def squat(port: int) -> socket.socket:
    """Listen on ``port`` as another worker's server would."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_first_start_moves_off_a_port_taken_meanwhile() -> None:
    server = RedisServer()
    chosen = server.port
    with squat(chosen), running(server):
        assert server.port != chosen
        assert ping(server.port) == b"+PONG\r\n"  # the server answering is the one started


def test_a_restart_keeps_its_port_or_says_it_was_taken() -> None:
    with running(RedisServer()) as server:
        port = server.port
        server.stop()
        with squat(port), pytest.raises(PortTaken):
            server.start()  # clients hold this address: moving would hide the outage under test
        server.start()
        assert server.port == port and ping(port) == b"+PONG\r\n"


def test_cluster_ports_stay_out_of_the_kernels_ephemeral_range() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
        first = int(file.read().split()[0])
    for _ in range(50):
        port = free_cluster_port()
        assert port + 10000 < first  # the bus port too: free_port() can never be handed either
