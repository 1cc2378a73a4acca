"""Loopback ports, written once: a free port to bind a rendezvous or a child's server to, and a
TCP probe. Imports nothing of cpkv and no torch (`cpkv.store.master` loads it in a bare child)."""

from __future__ import annotations

import socket

__all__ = ["free_port", "port_open"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (another process may take it before it is bound: a
    caller that starts a server on it retries on a fresh one, or owns the race)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connect to (host, port) succeeds within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
