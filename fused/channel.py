"""The channel between tether-fused and a helper process it supervises (the
file server, the DNS responder): a Unix socket in run_dir that only root can
reach, carrying frames of a 4-byte length and a `marshal`led dict, with file
descriptors alongside (SCM_RIGHTS). Standard library only: both helpers,
which start fast and import little, use it.
"""
from __future__ import annotations

import array
import logging
import marshal
import os
import socket
import struct
from typing import Callable, NamedTuple

log = logging.getLogger("tether")

FRAME = struct.Struct("<I")
MAX_FRAME = 256 << 20


def send_frame(sock: socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    data = marshal.dumps(msg)
    head = FRAME.pack(len(data))
    if fds:
        sock.sendmsg([head + data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(head + data)


def recv_frame(sock: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One frame (None at EOF) and any fds that came with it."""
    fds: list[int] = []
    head = b""
    while len(head) < FRAME.size:
        if with_fds:
            chunk, anc, _flags, _ = sock.recvmsg(FRAME.size - len(head), socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4])
        else:
            chunk = sock.recv(FRAME.size - len(head))
        if not chunk:
            return None, fds
        head += chunk
    (n,) = FRAME.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None, fds
        buf += chunk
    msg = marshal.loads(bytes(buf))
    if not isinstance(msg, dict):
        raise ValueError("frame is not a dict")
    return msg, fds


def listen(path: str) -> socket.socket:
    """The helper's end: bound under a temporary name with mode 0600, then
    renamed over `path`, so that a client never reaches a half-made socket
    and a new helper takes the name from the old one atomically."""
    tmp = f"{path}.{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    s.listen(16)
    os.replace(tmp, path)
    return s


def connect(path: str, timeout: float) -> socket.socket:
    """tether-fused's end: a connection to the helper listening at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    return s


class Response(NamedTuple):
    """A handler's answer: the frame, the fds sent with it, and whether the
    helper exits once it is sent (a "stop")."""

    msg: dict
    fds: list[int] = []
    exit: bool = False


def serve(conn: socket.socket, ops: dict[str, Callable[[dict, list[int]], Response]], who: str) -> None:
    """The helper's side of one connection, until it closes: each request's
    "op" picks its handler from `ops` (a table, not an if-chain); fds that
    came with a request are closed once it is answered."""
    with conn:
        while True:
            try:
                msg, fds = recv_frame(conn, with_fds=True)
            except (OSError, ValueError, EOFError) as e:
                log.warning("%s: %s", who, e)
                return
            if msg is None:
                return
            handler = ops.get(msg.get("op"))
            try:
                reply = handler(msg, fds) if handler else Response({"error": f"unknown op {msg.get('op')!r}"})
                send_frame(conn, reply.msg, reply.fds)
                if reply.exit:
                    os._exit(0)
            except OSError as e:
                log.warning("%s: %s", who, e)
                return
            except Exception:  # a bug: this connection ends, the helper goes on
                log.exception("%s: %s failed", who, msg.get("op"))
                return
            finally:
                for fd in fds:
                    os.close(fd)
