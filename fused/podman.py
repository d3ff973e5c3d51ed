"""podman: the hooks.d files (oci-hooks(5), schema 1.0.0) that run tether-hook.

`tether oci hooks-dir DIR` writes one file per stage, because tether-hook
takes its stage as an argument:

- tether-createruntime.json: `tether-hook [--config FILE] createRuntime`
  (podman puts it into the OCI spec; runc runs it with the netns made);
- tether-poststop.json: `tether-hook [--config FILE] poststop`
  (podman runs poststop hooks itself, at container clean-up, with an almost
  empty environment: hence the absolute path and the explicit --config).

Both apply only to containers with an `io.tether.*` annotation; any other
container is untouched. Writing is idempotent: a file that already holds
the same content is not rewritten.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .oci import HOOK_TIMEOUT

STAGES = ("createRuntime", "poststop")
WHEN = {"annotations": {r"^io\.tether\.": ".*"}}


def file_name(stage: str) -> str:
    return f"tether-{stage.lower()}.json"


def hook_file(hook: str, config: Path | None, stage: str) -> dict:
    """One hooks.d entry (schema 1.0.0) running `hook` at `stage`."""
    args = ["tether-hook"]
    if config is not None:
        args += ["--config", str(config)]
    return {
        "version": "1.0.0",
        "hook": {"path": hook, "args": args + [stage], "timeout": HOOK_TIMEOUT},
        "when": WHEN,
        "stages": [stage],
    }


def hook_files(hook: str, config: Path | None) -> dict[str, dict]:
    """{file name: content} for every stage tether needs."""
    return {file_name(stage): hook_file(hook, config, stage) for stage in STAGES}


def render(content: dict) -> str:
    return json.dumps(content, indent=2) + "\n"


def write_hooks_dir(directory: Path, hook: str, config: Path | None) -> list[tuple[Path, bool]]:
    """Write the files into `directory` (created if missing); returns
    (path, changed) per file. Files are replaced atomically, 0644."""
    if not os.path.isabs(hook):
        raise ValueError(f"hook path {hook!r} must be absolute: podman runs hooks without PATH")
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, content in hook_files(hook, config).items():
        path = directory / name
        text = render(content)
        try:
            same = path.read_text() == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            tmp = path.with_name(f".{name}.tether-tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        out.append((path, not same))
    return out
