"""The control protocol: versioned JSON lines over a Unix socket.

One request line, one answer line:

    {"v": 1, "op": "register", "args": {...}}\\n
    {"ok": true, "v": 1, "result": ...}\\n   or   {"ok": false, "v": 1, "error": "..."}\\n

Both sides import this: tether-fused (control.py) encodes answers with
`result_line`/`error_line`; tether-hook and the tether CLI send requests with
`exchange`/`request`. Standard library only, and only its cheapest parts at
import (`_socket`, no `json` until a line is encoded or decoded): tether-hook
imports it on every container start. Nothing from fused/ is imported here.
"""
from __future__ import annotations

import _socket

VERSION = 1
# a request line: a 1 MiB state, JSON-escaped (up to 6 bytes per byte), and room
MAX_LINE = 8 << 20
# every successful answer starts with exactly this (`result_line` writes "ok" first)
OK_PREFIX = b'{"ok": true, '


def request_line(op: str, args: dict | None = None) -> bytes:
    import json

    return json.dumps({"v": VERSION, "op": op, "args": args or {}}).encode() + b"\n"


def result_line(result) -> bytes:
    """The answer to a request that was done."""
    return _answer(True, result)


def error_line(message: str) -> bytes:
    """The answer to a request that was not done; `message` is for the user."""
    return _answer(False, message)


def _answer(ok: bool, payload) -> bytes:
    import json

    # "ok" first: clients recognise success by OK_PREFIX without decoding
    return json.dumps({"ok": ok, "v": VERSION, ("result" if ok else "error"): payload}).encode() + b"\n"


class DaemonError(Exception):
    """The daemon answered with an error (its message is for the user)."""


class Unreachable(Exception):
    """The daemon could not be reached or did not answer in time."""


_START = "start it with `systemctl start tether-fused` or `tether-fused --config FILE`"


def exchange(sock_path: str, line: bytes, timeout: float = 10.0) -> bytes:
    """Send one request line, return the answer line (raw)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(timeout)
    buf = b""
    try:
        try:
            s.connect(sock_path)
        except FileNotFoundError:
            raise Unreachable(f"tether-fused is not running (no socket at {sock_path}): {_START}") from None
        except ConnectionRefusedError:
            raise Unreachable(f"tether-fused is not listening on {sock_path}: {_START}") from None
        except PermissionError:
            raise Unreachable(f"permission denied on {sock_path}: run as root") from None
        s.sendall(line)
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * MAX_LINE:
                raise Unreachable("tether-fused sent an oversized answer")
    except TimeoutError:
        raise Unreachable(
            f"tether-fused did not answer within {timeout:g} s on {sock_path}: check its log "
            "(`journalctl -u tether-fused`)"
        ) from None
    except OSError as e:
        raise Unreachable(f"cannot talk to tether-fused on {sock_path}: {e.strerror or e}") from None
    finally:
        s.close()
    if not buf:
        raise Unreachable(f"tether-fused closed {sock_path} without answering: check its log")
    return buf


def decode(answer: bytes):
    """The result of an answer line, or DaemonError with the daemon's message."""
    import json

    try:
        resp = json.loads(answer)
    except ValueError:
        raise Unreachable("tether-fused sent a malformed answer: use the CLI and daemon of one installation") from None
    if not isinstance(resp, dict) or not resp.get("ok"):
        raise DaemonError(str(resp.get("error", "unknown error") if isinstance(resp, dict) else resp))
    return resp.get("result")


def request(sock_path: str, op: str, args: dict | None = None, timeout: float = 10.0):
    """Send one request and return its result, or raise DaemonError/Unreachable."""
    return decode(exchange(sock_path, request_line(op, args), timeout))
