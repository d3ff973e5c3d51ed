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


def _merge_annotation(ann: dict, key: str, values: list[str], parse, replaces=None) -> None:
    """Add `values` to a comma-list annotation, validated, without duplicates.
    `replaces(old, new)`: an old item that a new one takes the place of."""
    if not values:
        return
    parse(",".join(values), key)  # the new ones alone first: a clash among them is the user's
    old = [v for v in ann.get(key, "").split(",") if v.strip()]
    if replaces is not None:
        old = [o for o in old if not any(replaces(o, v) for v in values)]
    items = [v for v in (old + values) if v.strip()]
    merged: list[str] = []
    for v in items:
        if v not in merged:
            merged.append(v)
    parse(",".join(merged), key)  # raises InputError naming the key and the bad part
    ann[key] = ",".join(merged)


def _same_container_port(old: str, new: str) -> bool:
    """A second `--publish 9090:80` replaces the first `8080:80`."""
    try:
        (a,), (b,) = model.parse_publish(old), model.parse_publish(new)
    except (model.InputError, ValueError):
        return False
    return (a.port, a.proto) == (b.port, b.proto)


def _mount(dest: str, source: Path) -> dict:
    return {"destination": dest, "type": "bind", "source": str(source), "options": ["rbind", "ro", "nosuid", "nodev"]}


def served_mounts(fs_dir: Path, name: str, dns: bool) -> list[tuple[str, Path]]:
    """(destination in the container, source) of each served file."""
    out = [("/etc/hosts", fs_dir / name / "hosts"), ("/etc/tether", fs_dir / name)]
    if dns:
        out.append(("/etc/resolv.conf", fs_dir / name / "resolv.conf"))
    return out


def missing_mounts(spec: dict, fs_dir: Path, name: str, dns: bool) -> list[tuple[str, Path]]:
    """The served files that config.json does not already bind from `fs_dir`
    (as `tether oci patch` writes them): the createRuntime hook mounts these."""
    mounts = spec.get("mounts")
    have = {
        str(m.get("destination", "")).rstrip("/")
        for m in (mounts if isinstance(mounts, list) else [])
        if isinstance(m, dict) and str(m.get("source", "")).startswith(f"{fs_dir}/")
    }
    return [(dest, source) for dest, source in served_mounts(fs_dir, name, dns) if dest not in have]


def read_spec(bundle: object) -> dict:
    """A bundle's config.json, or {} when it cannot be read."""
    if not isinstance(bundle, str) or not os.path.isabs(bundle):
        return {}
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.loads(f.read(16 << 20))
    except (OSError, ValueError, RecursionError):
        return {}
    return spec if isinstance(spec, dict) else {}


def rootfs(spec: dict, bundle: str) -> str | None:
    """The container's root directory: root.path, relative to the bundle."""
    root = spec.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    if not isinstance(path, str) or not path:
        return None
    return os.path.normpath(os.path.join(bundle, path))


def apply(
    spec: dict,
    name: str,
    hook: str,
    config: Path | None,
    links: list[str] = (),
    expose: list[str] = (),
    publish: list[str] = (),
    fs_dir: Path | None = None,
    dns: bool = False,
    mounts: bool = True,
    env: dict[str, str] | None = None,
) -> dict:
    """Pure: the patched spec. `env`: DOCKER_LINK_PORT_* values known now."""
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
    ann = spec.setdefault("annotations", {})
    ann[model.ANN_NAME] = name
    _merge_annotation(ann, model.ANN_LINKS, list(links), model.parse_links)
    _merge_annotation(ann, model.ANN_EXPOSE, list(expose), model.parse_expose)
    _merge_annotation(ann, model.ANN_PUBLISH, list(publish), model.parse_publish, _same_container_port)
    if fs_dir is not None:
        ours = {"/etc/hosts", "/etc/tether", "/etc/resolv.conf"}
        kept = [m for m in spec.get("mounts", []) if m.get("destination") not in ours]
        if mounts:  # else the createRuntime hook mounts them (hooks only)
            kept += [_mount(dest, source) for dest, source in served_mounts(fs_dir, name, dns)]
        spec["mounts"] = kept
    if env:
        process = spec.setdefault("process", {})
        current = [e for e in process.get("env", []) if e.split("=", 1)[0] not in env]
        process["env"] = current + [f"{k}={v}" for k, v in sorted(env.items())]
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


def patch(bundle: Path, name: str, hook: str, config: Path | None, **extra) -> None:
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except OSError as e:
        raise PatchError(f"cannot read {path}: {e.strerror}; create it with `runc spec` in {bundle}") from None
    except ValueError as e:
        raise PatchError(f"{path} is not valid JSON ({e}): fix or regenerate it with `runc spec`") from None
    if not isinstance(spec, dict):
        raise PatchError(f"{path} must hold a JSON object: regenerate it with `runc spec`")
    apply(spec, name, hook, config, **extra)
    tmp = path.with_suffix(".json.tether-tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, path)
