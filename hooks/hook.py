"""tether-hook: the OCI runtime hook.

    tether-hook [--config FILE] createRuntime|prestart|poststop   < OCI state JSON

Sends the state, unparsed, in one request to tether-fused (which validates
it and reads the bundle's annotations) and exits 0, or prints one line naming
the cause and the fix and exits 1. When config.json does not mount tether's
files (podman, or a bundle patched with --no-mounts), the daemon's answer
says what to mount and the hook binds them into the container (mounts.py). It runs on every container start, so it
imports only the cheapest parts of the standard library: no json, re or enum
unless something goes wrong.
"""
from __future__ import annotations

import _json
import os
import sys
import time

from fused.protocol import OK_PREFIX, VERSION, DaemonError, Unreachable, decode, exchange

STAGES = {"createRuntime": "register", "prestart": "register", "poststop": "poststop"}
MAX_STATE = 1 << 20
TIMEOUT = 10.0
HOOK_BUDGET = 14.0  # s: the runtime kills the hook at its timeout (15 s in the hook entries tether writes)
DEFAULT_CONFIG = "/etc/tether/tether.toml"
DEFAULT_RUN_DIR = "/run/tether"
USAGE = "usage: tether-hook [--config FILE] createRuntime|prestart|poststop  (OCI state JSON on stdin)"


class HookError(Exception):
    pass


def _simple_run_dir(text: str) -> str | None:
    """run_dir from a top-level `run_dir = "..."` line; None when not that simple."""
    if '"""' in text or "'''" in text:
        return None  # multi-line strings: let tomllib decide
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            return DEFAULT_RUN_DIR if "run_dir" not in text else None
        if not s.startswith("run_dir"):
            continue
        key, eq, value = s.partition("=")
        value = value.strip()
        if key.strip() != "run_dir" or not eq or len(value) < 2 or value[0] not in "\"'":
            return None
        q = value[0]
        end = value.find(q, 1)
        rest = value[end + 1 :].strip() if end > 0 else "x"
        if end < 0 or "\\" in value[:end] or (rest and not rest.startswith("#")):
            return None
        return value[1:end]
    return DEFAULT_RUN_DIR if "run_dir" not in text else None


def run_dir(config: str | None) -> str:
    path = config or os.environ.get("TETHER_CONFIG")
    if not path:
        if not os.path.exists(DEFAULT_CONFIG):
            return DEFAULT_RUN_DIR
        path = DEFAULT_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HookError(f"cannot read config {path}: {getattr(e, 'strerror', e)}; fix the --config path in the hook") from None
    found = _simple_run_dir(text)
    if found is not None:
        return found
    import tomllib  # anything but the simple form

    try:
        value = tomllib.loads(text).get("run_dir", DEFAULT_RUN_DIR)
    except tomllib.TOMLDecodeError as e:
        raise HookError(f"config {path} is not valid TOML: {e}") from None
    if not isinstance(value, str):
        raise HookError(f"config {path}: run_dir must be a string")
    return value


def _parse_args(argv: list[str]) -> tuple[str | None, str]:
    config = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if not config:
                raise HookError("--config needs a file: " + USAGE)
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        else:
            rest.append(a)
    if len(rest) != 1:
        raise HookError("expected one STAGE argument: " + USAGE)
    if rest[0] not in STAGES:
        raise HookError(f"unknown stage {rest[0][:40]!r}: use createRuntime, prestart or poststop")
    return config, rest[0]


def _read_state(stream) -> str:
    raw = stream.read(MAX_STATE + 1)
    if len(raw) > MAX_STATE:
        raise HookError(f"OCI state on stdin is larger than {MAX_STATE} bytes: run tether-hook from an OCI runtime")
    return raw.decode("utf-8", "replace")


def request_line(op: str, stage: str, state: str, ppid: int | None = None) -> bytes:
    """One request; `ppid`, the hook's parent, is the runtime that runs it
    (the daemon learns from it where the runtime lists its containers).
    The same bytes as `protocol.request_line`, built without json."""
    enc = _json.encode_basestring_ascii
    extra = f', "ppid": {int(ppid)}' if ppid is not None else ""
    return (
        f'{{"v": {VERSION}, "op": {enc(op)}, "args": {{"stage": {enc(stage)}, "state_json": {enc(state)}{extra}}}}}\n'
    ).encode()


MOUNTS_PREFIX = OK_PREFIX + b'"v": %d, "result": {"mounts": "' % VERSION


def mount_plan(answer: bytes) -> tuple[int, str, list[tuple[str, str]]] | None:
    """What a registration's answer asks the hook to mount: (pid, rootfs,
    [(source, destination)]), or None. The daemon puts it first in its answer
    as one string, "PID\\0ROOTFS\\0SOURCE\\0DEST...", so that finding it needs
    no json module."""
    if not answer.startswith(MOUNTS_PREFIX):
        return None
    text, _ = _json.scanstring(answer.decode("utf-8", "replace"), len(MOUNTS_PREFIX))
    if not text:
        return None
    pid, rootfs, *rest = text.split("\0")
    return int(pid), rootfs, list(zip(rest[0::2], rest[1::2]))


def _mount(sock: str, stage: str, state: str, answer: bytes, deadline: float) -> None:
    """Bind the served files into the container; on failure, tell the daemon
    to undo the registration (nothing left behind) and fail the start."""
    try:
        plan = mount_plan(answer)
        if plan is None:
            return
        from .mounts import MountError, bind_into

        bind_into(*plan)
    except Exception as e:  # noqa: BLE001 - whatever it was, the start must not go on half done
        message = str(e) if type(e).__name__ == "MountError" else f"cannot mount tether's files: {type(e).__name__}: {e}"
        try:  # within what the runtime gives the hook (the hooks' timeout is 15 s)
            exchange(sock, request_line("abort", stage, state), timeout=max(0.5, deadline - time.monotonic()))
        except Unreachable:
            pass
        raise HookError(message) from None


def run(argv: list[str], stdin=None) -> int:
    stdin = stdin if stdin is not None else sys.stdin.buffer
    started = time.monotonic()
    try:
        config, stage = _parse_args(argv)
        op = STAGES[stage]
        state = _read_state(stdin)
        line = request_line(op, stage, state, os.getppid())
        sock = os.path.join(run_dir(config), "fused.sock")
        try:
            answer = exchange(sock, line, timeout=TIMEOUT)
            if not answer.startswith(OK_PREFIX):
                decode(answer)
            if op == "register":
                _mount(sock, stage, state, answer, started + HOOK_BUDGET)
        except Unreachable as e:
            if op == "poststop":
                # The daemon marks containers whose netns is gone as stopped
                # when it starts again; a stop must never fail on its account.
                print(f"tether-hook: warning: {e} (the stop is recorded when it starts)", file=sys.stderr)
                return 0
            raise HookError(str(e)) from None
        except DaemonError as e:
            raise HookError(str(e)) from None
    except HookError as e:
        print(f"tether-hook: {e}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
