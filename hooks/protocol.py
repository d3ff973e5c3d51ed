"""The control protocol's client side: versioned JSON lines over a Unix socket.

Standard library only: tether-hook imports it on every container start, and
the tether CLI uses it too.

Request:  {"v": 1, "op": "register", "args": {...}}\\n
Response: {"v": 1, "ok": true, "result": ...}\\n  or  {"v": 1, "ok": false, "error": "..."}\\n
"""
from __future__ import annotations

import json
import socket

VERSION = 1
MAX_LINE = 1 << 20


class DaemonError(Exception):
    """The daemon answered with an error (its message is for the user)."""


class Unreachable(Exception):
    """The daemon could not be reached or did not answer in time."""


def request(sock_path: str, op: str, args: dict | None = None, timeout: float = 10.0):
    line = json.dumps({"v": VERSION, "op": op, "args": args or {}}).encode() + b"\n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_path)
        except FileNotFoundError:
            raise Unreachable(
                f"tether-fused is not running (no socket at {sock_path}): start it with "
                "`systemctl start tether-fused` or `tether-fused --config FILE`"
            ) from None
        except ConnectionRefusedError:
            raise Unreachable(
                f"tether-fused is not listening on {sock_path}: start it with "
                "`systemctl start tether-fused` or `tether-fused --config FILE`"
            ) from None
        except PermissionError:
            raise Unreachable(f"permission denied on {sock_path}: run as root") from None
        s.sendall(line)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * MAX_LINE:
                raise Unreachable("tether-fused sent an oversized answer")
    except socket.timeout:
        raise Unreachable(
            f"tether-fused did not answer within {timeout:g} s on {sock_path}: check `journalctl -u tether-fused`"
        ) from None
    except OSError as e:
        raise Unreachable(f"cannot talk to tether-fused on {sock_path}: {e.strerror or e}") from None
    finally:
        s.close()
    if not buf:
        raise Unreachable(f"tether-fused closed {sock_path} without answering: check its log")
    try:
        resp = json.loads(buf)
    except ValueError:
        raise Unreachable("tether-fused sent a malformed answer: check its version") from None
    if not resp.get("ok"):
        raise DaemonError(str(resp.get("error", "unknown error")))
    return resp.get("result")
