"""tether-hook: the OCI runtime hook.

    tether-hook [--config FILE] createRuntime|prestart|poststop   < OCI state JSON

Parses the state, sends one request to tether-fused and exits 0, or prints one
line naming the cause and the fix and exits 1. Standard library only.
"""
from __future__ import annotations

import json
import os
import sys

from .protocol import DaemonError, Unreachable, request

STAGES = {"createRuntime": "register", "prestart": "register", "poststop": "poststop"}
MAX_STATE = 1 << 20
TIMEOUT = 10.0
DEFAULT_CONFIG = "/etc/tether/tether.toml"
USAGE = "usage: tether-hook [--config FILE] createRuntime|prestart|poststop  (OCI state JSON on stdin)"


class HookError(Exception):
    pass


def _run_dir(config: str | None) -> str:
    path = config or os.environ.get("TETHER_CONFIG")
    if not path:
        if not os.path.exists(DEFAULT_CONFIG):
            return "/run/tether"
        path = DEFAULT_CONFIG
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise HookError(f"cannot read config {path}: {e.strerror}; fix the --config path in the hook") from None
    except tomllib.TOMLDecodeError as e:
        raise HookError(f"config {path} is not valid TOML: {e}") from None
    run_dir = data.get("run_dir", "/run/tether")
    if not isinstance(run_dir, str):
        raise HookError(f"config {path}: run_dir must be a string")
    return run_dir


def _read_state(stream) -> dict:
    raw = stream.buffer.read(MAX_STATE + 1) if hasattr(stream, "buffer") else stream.read(MAX_STATE + 1)
    if len(raw) > MAX_STATE:
        raise HookError(f"OCI state on stdin is larger than {MAX_STATE} bytes: run tether-hook from an OCI runtime")
    try:
        state = json.loads(raw)
    except ValueError as e:
        raise HookError(f"OCI state on stdin is not valid JSON ({e}): run tether-hook from an OCI runtime") from None
    if not isinstance(state, dict):
        raise HookError("OCI state on stdin must be a JSON object: run tether-hook from an OCI runtime")
    return state


def _annotations(state: dict) -> dict | None:
    ann = state.get("annotations")
    if ann:
        return ann
    bundle = state.get("bundle")
    if not isinstance(bundle, str) or not os.path.isabs(bundle):
        return ann
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.loads(f.read(16 << 20))
    except (OSError, ValueError):
        return ann
    found = spec.get("annotations") if isinstance(spec, dict) else None
    return found if isinstance(found, dict) else ann


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


def run(argv: list[str], stdin=None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    try:
        config, stage = _parse_args(argv)
        op = STAGES[stage]
        state = _read_state(stdin)
        args = {"state": state, "annotations": _annotations(state), "stage": stage}
        sock = os.path.join(_run_dir(config), "fused.sock")
        try:
            request(sock, op, args, timeout=TIMEOUT)
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
