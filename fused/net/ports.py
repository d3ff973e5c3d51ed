"""Host ports that a host process already uses (what podman and Docker refuse)."""
from __future__ import annotations

import errno
import socket


def in_use(port: int, proto: str) -> bool:
    """Whether binding `port` on every address fails because something on
    the host holds it (a listener, a bound UDP socket). tether's own published
    ports are DNAT rules, not sockets: they never count."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        if proto == "tcp":  # connections in TIME_WAIT are no listener
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False
