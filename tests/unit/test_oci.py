"""fused.oci: `tether oci patch` on a runc bundle's config.json."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fused import oci
from fused.model import InputError
from fused.oci import PatchError, apply, patch

HOOK = "/usr/local/bin/tether-hook"
CFG = Path("/etc/tether/test.toml")


def runc_spec() -> dict:
    """A trimmed `runc spec` output: no network namespace, no hooks."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": False, "args": ["sh"], "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        },
    }


def test_apply_adds_create_runtime_and_poststop_hooks_with_config():
    spec = apply(runc_spec(), "db", HOOK, CFG)
    hooks = spec["hooks"]
    assert set(hooks) == {"createRuntime", "poststop"}
    for stage in ("createRuntime", "poststop"):
        (entry,) = hooks[stage]
        assert entry["path"] == HOOK
        assert Path(entry["path"]).is_absolute()
        assert entry["args"] == ["tether-hook", "--config", str(CFG), stage]
        assert entry["timeout"] == oci.HOOK_TIMEOUT
        assert entry["timeout"] > 10  # longer than the hook's own daemon timeout


def test_apply_without_config_has_no_config_args():
    spec = apply(runc_spec(), "db", HOOK, None)
    assert spec["hooks"]["createRuntime"][0]["args"] == ["tether-hook", "createRuntime"]
    assert spec["hooks"]["poststop"][0]["args"] == ["tether-hook", "poststop"]


def test_apply_sets_name_annotation_and_keeps_others():
    s = runc_spec()
    s["annotations"] = {"org.example": "x", "io.tether.name": "old"}
    spec = apply(s, "db", HOOK, None)
    assert spec["annotations"] == {"org.example": "x", "io.tether.name": "db"}


def test_apply_adds_network_namespace_when_missing():
    spec = apply(runc_spec(), "db", HOOK, None)
    ns = spec["linux"]["namespaces"]
    assert [n for n in ns if n["type"] == "network"] == [{"type": "network"}]
    assert [n["type"] for n in ns[:4]] == ["pid", "ipc", "uts", "mount"]


def test_apply_creates_linux_section_when_absent():
    s = runc_spec()
    del s["linux"]
    spec = apply(s, "db", HOOK, None)
    assert spec["linux"]["namespaces"] == [{"type": "network"}]


def test_apply_keeps_an_existing_new_network_namespace():
    s = runc_spec()
    s["linux"]["namespaces"].append({"type": "network"})
    spec = apply(s, "db", HOOK, None)
    assert sum(1 for n in spec["linux"]["namespaces"] if n["type"] == "network") == 1


def test_apply_rejects_joining_an_existing_network_namespace():
    s = runc_spec()
    s["linux"]["namespaces"].append({"type": "network", "path": "/var/run/netns/host"})
    with pytest.raises(PatchError) as ei:
        apply(s, "db", HOOK, None)
    assert "network" in str(ei.value) and "path" in str(ei.value)


def test_apply_keeps_other_tools_hooks_in_order():
    s = runc_spec()
    other_cr = {"path": "/usr/bin/other-hook", "args": ["other-hook", "create"]}
    other_ps = {"path": "/usr/libexec/cleanup", "args": ["cleanup"]}
    other_pre = {"path": "/usr/bin/nvidia-hook", "args": ["nvidia-hook", "prestart"]}
    other_start = {"path": "/usr/bin/logger"}
    s["hooks"] = {
        "createRuntime": [other_cr],
        "poststop": [other_ps],
        "prestart": [other_pre],
        "startContainer": [other_start],
    }
    spec = apply(s, "db", HOOK, CFG)
    assert spec["hooks"]["createRuntime"][0] == other_cr
    assert spec["hooks"]["createRuntime"][1]["path"] == HOOK
    assert spec["hooks"]["poststop"][0] == other_ps
    assert spec["hooks"]["poststop"][1]["path"] == HOOK
    assert spec["hooks"]["prestart"] == [other_pre]
    assert spec["hooks"]["startContainer"] == [other_start]


def test_apply_drops_an_old_tether_prestart_entry():
    s = runc_spec()
    s["hooks"] = {"prestart": [{"path": "/opt/old/tether-hook", "args": ["tether-hook", "prestart"]}]}
    spec = apply(s, "db", HOOK, None)
    assert "prestart" not in spec["hooks"]
    assert len(spec["hooks"]["createRuntime"]) == 1


def test_apply_replaces_an_older_tether_entry_instead_of_duplicating():
    spec = apply(runc_spec(), "db", "/opt/old/bin/tether-hook", Path("/old.toml"))
    spec = apply(spec, "db", HOOK, CFG)
    for stage in ("createRuntime", "poststop"):
        (entry,) = spec["hooks"][stage]
        assert entry["path"] == HOOK
        assert "/old.toml" not in entry["args"]


def test_apply_is_idempotent():
    s = runc_spec()
    s["hooks"] = {"createRuntime": [{"path": "/usr/bin/other"}], "poststop": [{"path": "/usr/bin/x"}]}
    once = apply(copy.deepcopy(s), "db", HOOK, CFG)
    twice = apply(apply(copy.deepcopy(s), "db", HOOK, CFG), "db", HOOK, CFG)
    assert json.dumps(once) == json.dumps(twice)
    assert json.dumps(once) != json.dumps(s)


def test_apply_renaming_replaces_the_annotation():
    spec = apply(apply(runc_spec(), "db", HOOK, None), "db2", HOOK, None)
    assert spec["annotations"]["io.tether.name"] == "db2"
    assert len(spec["hooks"]["createRuntime"]) == 1


@pytest.mark.parametrize("name", ["", "DB", "db\n", "a b", "../x", "x" * 64, "-db"])
def test_apply_rejects_invalid_names(name):
    s = runc_spec()
    with pytest.raises(InputError):
        apply(s, name, HOOK, None)
    assert s == runc_spec()  # checked before touching the spec


# --- patch: the file ---------------------------------------------------------


def write_spec(bundle: Path, spec: object) -> Path:
    p = bundle / "config.json"
    p.write_text(json.dumps(spec, indent="\t"))
    return p


def test_patch_writes_the_patched_spec(tmp_path):
    p = write_spec(tmp_path, runc_spec())
    patch(tmp_path, "db", HOOK, CFG)
    got = json.loads(p.read_text())
    assert got == apply(runc_spec(), "db", HOOK, CFG)
    assert p.read_text().endswith("}\n")
    assert not list(tmp_path.glob("*tether-tmp*"))


def test_patch_is_idempotent_byte_for_byte(tmp_path):
    p = write_spec(tmp_path, runc_spec())
    patch(tmp_path, "db", HOOK, CFG)
    first = p.read_bytes()
    patch(tmp_path, "db", HOOK, CFG)
    assert p.read_bytes() == first
    patch(tmp_path, "db", HOOK, CFG)
    assert p.read_bytes() == first


def test_patch_missing_config_json(tmp_path):
    with pytest.raises(PatchError) as ei:
        patch(tmp_path, "db", HOOK, None)
    msg = str(ei.value)
    assert str(tmp_path / "config.json") in msg
    assert "runc spec" in msg
    assert not (tmp_path / "config.json").exists()


def test_patch_missing_bundle_dir(tmp_path):
    with pytest.raises(PatchError, match="cannot read"):
        patch(tmp_path / "nope", "db", HOOK, None)


def test_patch_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"ociVersion": ')
    with pytest.raises(PatchError) as ei:
        patch(tmp_path, "db", HOOK, None)
    assert "not valid JSON" in str(ei.value)
    assert str(p) in str(ei.value)
    assert p.read_text() == '{"ociVersion": '  # untouched


def test_patch_non_object_json(tmp_path):
    p = write_spec(tmp_path, ["not", "a", "spec"])
    before = p.read_bytes()
    with pytest.raises(PatchError, match="JSON object"):
        patch(tmp_path, "db", HOOK, None)
    assert p.read_bytes() == before


def test_patch_netns_path_leaves_file_untouched(tmp_path):
    s = runc_spec()
    s["linux"]["namespaces"].append({"type": "network", "path": "/proc/1/ns/net"})
    p = write_spec(tmp_path, s)
    before = p.read_bytes()
    with pytest.raises(PatchError):
        patch(tmp_path, "db", HOOK, None)
    assert p.read_bytes() == before


def test_patch_invalid_name_leaves_file_untouched(tmp_path):
    p = write_spec(tmp_path, runc_spec())
    before = p.read_bytes()
    with pytest.raises(InputError):
        patch(tmp_path, "Bad Name", HOOK, None)
    assert p.read_bytes() == before


# --- issue 11: publish replaced, hooks-only bundles, what the hook mounts --------


def test_a_second_patch_replaces_the_published_port_of_the_same_container_port(tmp_path):
    spec = apply(runc_spec(), "db", HOOK, None, publish=["8080:80"])
    spec = apply(spec, "db", HOOK, None, publish=["9090:80", "53/udp"])
    assert spec["annotations"]["io.tether.publish"] == "9090:80,53/udp"
    spec = apply(spec, "db", HOOK, None, publish=["80"])  # now an automatic host port
    assert spec["annotations"]["io.tether.publish"] == "53/udp,80"


def test_one_patch_publishing_a_port_twice_is_refused_and_changes_nothing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(runc_spec()))
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(InputError, match="published twice"):
        patch(tmp_path, "db", HOOK, None, publish=["8080:80", "9090:80"])
    assert (tmp_path / "config.json").read_text() == before


def test_no_mounts_removes_ours_and_the_hook_mounts_them(tmp_path):
    fs = Path("/run/t/fs")
    spec = apply(runc_spec(), "web", HOOK, None, fs_dir=fs, dns=True)
    assert oci.missing_mounts(spec, fs, "web", True) == []
    hooks_only = apply(copy.deepcopy(spec), "web", HOOK, None, fs_dir=fs, dns=True, mounts=False)
    assert [m["destination"] for m in hooks_only["mounts"]] == [m["destination"] for m in runc_spec().get("mounts", [])]
    assert oci.missing_mounts(hooks_only, fs, "web", True) == [
        ("/etc/hosts", fs / "web" / "hosts"), ("/etc/tether", fs / "web"), ("/etc/resolv.conf", fs / "web" / "resolv.conf")]
    assert oci.missing_mounts(hooks_only, fs, "web", False) == [("/etc/hosts", fs / "web" / "hosts"), ("/etc/tether", fs / "web")]


def test_missing_mounts_counts_only_mounts_of_this_fs_dir():
    fs = Path("/run/t/fs")
    spec = {"mounts": [
        {"destination": "/etc/hosts", "source": "/var/lib/podman/userdata/hosts"},  # podman's own: mounted over
        {"destination": "/etc/tether/", "source": "/run/t/fs/web"},
        {"destination": "/etc/resolv.conf", "source": "/run/other/fs/web/resolv.conf"},
    ]}
    assert [d for d, _ in oci.missing_mounts(spec, fs, "web", True)] == ["/etc/hosts", "/etc/resolv.conf"]
    assert len(oci.missing_mounts({"mounts": "junk"}, fs, "web", True)) == 3


def test_rootfs_is_relative_to_the_bundle():
    assert oci.rootfs({"root": {"path": "rootfs"}}, "/b/web") == "/b/web/rootfs"
    assert oci.rootfs({"root": {"path": "/abs/r/"}}, "/b/web") == "/abs/r"
    assert oci.rootfs({}, "/b") is None and oci.rootfs({"root": {"path": ""}}, "/b") is None
