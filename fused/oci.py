"""`tether oci patch`: add tether's hooks and annotations to a runc bundle.

Idempotent: patching twice gives the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import model

HOOK_TIMEOUT = 15  # seconds; the hook itself gives up on the daemon after 10


class PatchError(Exception):
    pass


def _hook_entry(hook: str, config: Path | None, stage: str) -> dict:
    args = ["tether-hook"]
    if config is not None:
        args += ["--config", str(config)]
    return {"path": hook, "args": args + [stage], "timeout": HOOK_TIMEOUT}


def _is_ours(entry: object) -> bool:
    return isinstance(entry, dict) and os.path.basename(str(entry.get("path", ""))) == "tether-hook"


def apply(spec: dict, name: str, hook: str, config: Path | None) -> dict:
    """Pure: the patched spec."""
    model.check_label(name)
    hooks = spec.setdefault("hooks", {})
    for stage in ("createRuntime", "poststop"):
        entries = [e for e in hooks.get(stage, []) if not _is_ours(e)]
        entries.append(_hook_entry(hook, config, stage))
        hooks[stage] = entries
    # prestart would run the same registration twice: drop a tether prestart entry
    if "prestart" in hooks:
        hooks["prestart"] = [e for e in hooks["prestart"] if not _is_ours(e)]
        if not hooks["prestart"]:
            del hooks["prestart"]
    spec.setdefault("annotations", {})[model.ANN_NAME] = name
    linux = spec.setdefault("linux", {})
    namespaces = linux.setdefault("namespaces", [])
    net = [ns for ns in namespaces if ns.get("type") == "network"]
    if net and net[0].get("path"):
        raise PatchError(
            "config.json joins an existing network namespace (linux.namespaces network path): "
            "tether needs a new one; remove the path"
        )
    if not net:
        namespaces.append({"type": "network"})
    return spec


def patch(bundle: Path, name: str, hook: str, config: Path | None) -> None:
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except OSError as e:
        raise PatchError(f"cannot read {path}: {e.strerror}; create it with `runc spec` in {bundle}") from None
    except ValueError as e:
        raise PatchError(f"{path} is not valid JSON ({e}): fix or regenerate it with `runc spec`") from None
    if not isinstance(spec, dict):
        raise PatchError(f"{path} must hold a JSON object: regenerate it with `runc spec`")
    apply(spec, name, hook, config)
    tmp = path.with_suffix(".json.tether-tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, path)
