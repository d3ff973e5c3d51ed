"""Where podman reads hooks.d files (fused.podman), and the hook's mount plan."""
from __future__ import annotations

import json
from pathlib import Path

from fused import podman
from hooks import hook


def test_default_is_podman_4s_built_in_dir(tmp_path):
    conf = tmp_path / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n')
    assert podman.hooks_dirs({"CONTAINERS_CONF": str(conf)}) == ["/usr/share/containers/oci/hooks.d"]


def test_hooks_dir_of_containers_conf_wins(tmp_path):
    conf = tmp_path / "containers.conf"
    conf.write_text('[engine]\nhooks_dir = ["/etc/containers/oci/hooks.d", "/opt/h"]\n')
    assert podman.hooks_dirs({"CONTAINERS_CONF": str(conf)}) == ["/etc/containers/oci/hooks.d", "/opt/h"]
    conf.write_text("[engine\nbroken")  # podman refuses it; nothing to learn from it
    assert podman.hooks_dirs({"CONTAINERS_CONF": str(conf)}) == podman.DEFAULT_HOOKS_DIRS


def test_containers_conf_env_replaces_the_system_files(tmp_path):
    assert podman.containers_confs({"CONTAINERS_CONF": "/x.conf"}) == [Path("/x.conf")]
    system = podman.containers_confs({})
    assert system[:2] == [Path(p) for p in podman.SYSTEM_CONFS]


def test_find_hooks_any_file_name_only_tether_hook(tmp_path):
    written = podman.write_hooks_dir(tmp_path, "/opt/tether/bin/tether-hook", Path("/etc/t.toml"))
    (tmp_path / "other.json").write_text(json.dumps({"hook": {"path": "/usr/bin/nvidia-hook"}, "stages": ["prestart"]}))
    (tmp_path / "junk.json").write_text("{")
    found = podman.find_hooks(str(tmp_path))
    assert [(f.path.name, f.stage, f.hook, f.config) for f in found] == [
        ("tether-createruntime.json", "createRuntime", "/opt/tether/bin/tether-hook", "/etc/t.toml"),
        ("tether-poststop.json", "poststop", "/opt/tether/bin/tether-hook", "/etc/t.toml"),
    ]
    assert len(written) == 2 and podman.find_hooks(str(tmp_path / "none")) == []


def test_mount_plan_round_trip():
    """The daemon puts the plan first in its answer; the hook finds it with no json module."""
    plan = "\0".join(["4242", "/b/r oot", "/run/t/fs/web/hosts", "/etc/hosts", "/run/t/fs/web", "/etc/tether"])
    answer = json.dumps({"ok": True, "v": 1, "result": {"mounts": plan, "name": "web"}}).encode() + b"\n"
    assert hook.mount_plan(answer) == (4242, "/b/r oot", [("/run/t/fs/web/hosts", "/etc/hosts"), ("/run/t/fs/web", "/etc/tether")])
    empty = json.dumps({"ok": True, "v": 1, "result": {"mounts": "", "name": "web"}}).encode()
    assert hook.mount_plan(empty) is None
    assert hook.mount_plan(b'{"ok": true, "v": 1, "result": {"name": "web"}}') is None  # an older daemon
