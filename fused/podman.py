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

Where: podman reads hooks.d files only from the directories `[engine]
hooks_dir` of its containers.conf names, by default (podman 4)
/usr/share/containers/oci/hooks.d alone; `hooks_dirs()` reads the same
files podman reads, and `tether oci hooks-dir` writes into the first.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .oci import HOOK_TIMEOUT

STAGES = ("createRuntime", "poststop")
WHEN = {"annotations": {r"^io\.tether\.": ".*"}}
DEFAULT_HOOKS_DIRS = ["/usr/share/containers/oci/hooks.d"]  # podman 4's built-in hooks_dir
# where hooks.d files are often put by hand (and where tether's install.sh once put them),
# but podman 4 does not read unless containers.conf says so
OTHER_HOOKS_DIRS = ["/etc/containers/oci/hooks.d"]
SYSTEM_CONFS = ["/usr/share/containers/containers.conf", "/etc/containers/containers.conf"]
CONF_D = "/etc/containers/containers.conf.d"


def containers_confs(env=os.environ) -> list[Path]:
    """The containers.conf files podman (as root) reads, in order: only
    $CONTAINERS_CONF when set, else the system files and containers.conf.d."""
    if env.get("CONTAINERS_CONF"):
        return [Path(env["CONTAINERS_CONF"])]
    confs = [Path(p) for p in SYSTEM_CONFS]
    try:
        confs += sorted(p for p in Path(CONF_D).iterdir() if p.suffix == ".conf")
    except OSError:
        pass
    return confs


def hooks_dirs(env=os.environ) -> list[str]:
    """The directories podman reads hooks.d files from: `[engine] hooks_dir`
    of the last containers.conf that sets it, else the built-in default."""
    dirs = DEFAULT_HOOKS_DIRS
    for conf in containers_confs(env):
        try:
            engine = tomllib.loads(conf.read_text()).get("engine", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue  # podman itself refuses a broken file; nothing to learn here
        value = engine.get("hooks_dir") if isinstance(engine, dict) else None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            dirs = value
    return list(dirs)


@dataclass(frozen=True)
class Found:
    """A hooks.d file that runs tether-hook."""

    path: Path
    stage: str
    hook: str  # the tether-hook it runs
    config: str | None  # its --config


def find_hooks(directory: str) -> list[Found]:
    """tether's hooks.d files in `directory` (any file name)."""
    out = []
    try:
        files = sorted(p for p in Path(directory).iterdir() if p.suffix == ".json")
    except OSError:
        return []
    for path in files:
        try:
            content = json.loads(path.read_text())
            hook = content["hook"]
            if os.path.basename(hook["path"]) != "tether-hook":
                continue
            args = [str(a) for a in hook.get("args", [])]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        config = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), None)
        for stage in content.get("stages", []):
            out.append(Found(path, stage, hook["path"], config))
    return out


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
