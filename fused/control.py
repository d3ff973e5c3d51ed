"""The control socket: versioned JSON lines over a Unix socket, root only."""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
from pathlib import Path

import trio

from hooks.protocol import MAX_LINE, VERSION

from .model import InputError

log = logging.getLogger("tether.control")


def peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def bind_socket(path: Path) -> trio.SocketListener:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return trio.SocketListener(sock)


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
        if len(buf) > MAX_LINE:
            raise InputError(f"request larger than {MAX_LINE} bytes: send less")
    return bytes(buf[: buf.index(b"\n")])


def _reply(ok: bool, payload) -> bytes:
    # "ok" first: the hook recognises success by the prefix OK_PREFIX
    body = {"ok": ok, "v": VERSION, ("result" if ok else "error"): payload}
    return json.dumps(body).encode() + b"\n"


async def handle(stream: trio.SocketStream, dispatch) -> None:
    from .net.wiring import WiringError  # local: these import heavy modules
    from .service import ServiceError

    async with stream:
        if peer_uid(stream.socket) != 0:
            await stream.send_all(_reply(False, "permission denied: the tether control socket is root only"))
            return
        while True:
            try:
                line = await _read_line(stream)
                if line is None:
                    return
                try:
                    req = json.loads(line)
                except ValueError:
                    raise InputError("request is not valid JSON: use the tether CLI or tether-hook") from None
                if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                    raise InputError("request must be a JSON object with an 'op'")
                if req.get("v") != VERSION:
                    raise InputError(
                        f"protocol version {req.get('v')!r} is not supported (daemon speaks {VERSION}): "
                        "use the tether CLI and hook of the same installation"
                    )
                args = req.get("args") or {}
                if not isinstance(args, dict):
                    raise InputError("request 'args' must be a JSON object")
                result = await dispatch(req["op"], args)
                out = _reply(True, result)
            except (InputError, ServiceError, WiringError) as e:
                out = _reply(False, str(e))
            except trio.BrokenResourceError:
                return
            except Exception as e:  # a bug: answer, log, keep serving
                log.exception("request failed")
                out = _reply(False, f"internal error: {type(e).__name__}: {e}; see the tether-fused log")
            try:
                await stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def serve(path: Path, dispatch, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listener = await bind_socket(path)
    task_status.started()

    async def handler(stream):
        await handle(stream, dispatch)

    await trio.serve_listeners(handler, [listener])
