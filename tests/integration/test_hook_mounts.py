"""Issue 11: the createRuntime hook mounts the served files itself when
config.json has no tether mounts (podman, or `tether oci patch --no-mounts`),
over the runtime's own /etc/hosts and /etc/resolv.conf, on a read-only rootfs
too; a target it cannot create fails the start in one line, leaving nothing.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from harness import Daemon, address_in_hosts, bridge_ports, serve, sh

LOCAL = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SLEEP = ["sleep", "1000000"]


def mounts_inside(d: Daemon, cid: str) -> dict[str, list[str]]:
    """Mount point -> [its options] for every mount in the container, in order."""
    out: dict[str, list[str]] = {}
    for line in d.exec(cid, "cat", "/proc/self/mountinfo").stdout.splitlines():
        fields = line.split()
        out.setdefault(fields[4], []).append(fields[5])
    return out


def tether_mounts(spec: dict, d: Daemon) -> list[str]:
    return [m["destination"] for m in spec.get("mounts", []) if m.get("source", "").startswith(str(d.run_dir))]


@pytest.fixture
def facade_daemon(rootfs):
    d = Daemon(rootfs, strategy="facade")
    try:
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture
def readonly_rootfs(rootfs):
    """A copy of the rootfs behind a read-only bind mount: nothing can be
    created in it, whatever runc's root.readonly says."""
    top = Path(tempfile.mkdtemp(prefix="tether-rorootfs-"))
    rw, ro = top / "rw", top / "ro"
    shutil.copytree(rootfs, rw, symlinks=True)
    shutil.rmtree(rw / "etc" / "tether", ignore_errors=True)  # runc makes it in the shared rootfs
    ro.mkdir()
    sh("mount", "--bind", str(rw), str(ro))
    try:
        sh("mount", "-o", "remount,bind,ro", str(ro))
        yield rw, ro
    finally:
        sh("umount", "-l", str(ro), check=False)
        shutil.rmtree(top, ignore_errors=True)


def test_hooks_only_bundle_gets_the_files_from_the_hook(facade_daemon):
    d = facade_daemon
    d.start_container("db", None, "--expose", "5432", "--no-mounts")
    d.start_container("db2", None, "--expose", "5432", "--no-mounts")
    b = d.start_container("web", SLEEP, "--link", "db:database", "--no-mounts")
    spec = json.loads((b / "config.json").read_text())
    assert tether_mounts(spec, d) == []  # nothing in config.json: the hook did it
    assert spec["root"]["readonly"] is True
    web = d.container("web")
    hosts = d.exec("web", "cat", "/etc/hosts").stdout
    facade = address_in_hosts(hosts, "database")
    assert hosts == LOCAL + f"{web['ip']}\tweb\n{facade}\tdatabase db\n"
    assert d.exec("web", "cat", "/etc/tether/ports").stdout == f"database\ttcp\t5432\t{facade}\n"
    assert d.exec("web", "cat", "/etc/resolv.conf").stdout.startswith(f"nameserver {d.gateway}\n")
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db"
    mounts = mounts_inside(d, "web")
    for point in ("/etc/hosts", "/etc/tether", "/etc/resolv.conf"):
        assert len(mounts[point]) == 1 and mounts[point][0].split(",")[0] == "ro", (point, mounts)
    # live: a retarget shows on the next read, through the hook's mounts
    d.cli("link", "retarget", "web", "database", "db2")
    assert d.exec("web", "cat", "/etc/hosts").stdout.endswith(f"{facade}\tdatabase db2\n")
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db2"
    r = d.exec("web", "sh", "-c", "echo x > /etc/hosts", check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr


def test_over_the_runtimes_own_hosts_and_resolv_conf(facade_daemon):
    """A runtime's own binds of /etc/hosts and /etc/resolv.conf (podman's, with a
    network) stay underneath: the container sees tether's."""
    d = facade_daemon
    theirs = d.dir / "userdata"
    theirs.mkdir()
    (theirs / "hosts").write_text("10.88.0.9\tpodman-wrote-this\n")
    (theirs / "resolv.conf").write_text("nameserver 10.88.0.1\n")
    b = d.bundle("web", SLEEP, "--no-mounts")
    spec = json.loads((b / "config.json").read_text())
    spec["mounts"] += [
        {"destination": f"/etc/{f}", "type": "bind", "source": str(theirs / f), "options": ["rbind", "rw"]}
        for f in ("hosts", "resolv.conf")
    ]
    (b / "config.json").write_text(json.dumps(spec))
    d.run("web", b)
    assert d.exec("web", "cat", "/etc/hosts").stdout == LOCAL + f"{d.container('web')['ip']}\tweb\n"
    assert d.exec("web", "cat", "/etc/resolv.conf").stdout.startswith(f"nameserver {d.gateway}\n")
    mounts = mounts_inside(d, "web")
    assert [len(mounts["/etc/hosts"]), len(mounts["/etc/resolv.conf"])] == [2, 2]  # theirs, ours on top
    assert (theirs / "hosts").read_text() == "10.88.0.9\tpodman-wrote-this\n"  # untouched


def test_oci_patch_mounts_are_not_mounted_again(facade_daemon):
    d = facade_daemon
    b = d.start_container("web", SLEEP)
    assert sorted(tether_mounts(json.loads((b / "config.json").read_text()), d)) == [
        "/etc/hosts", "/etc/resolv.conf", "/etc/tether"]
    mounts = mounts_inside(d, "web")
    assert [len(mounts[p]) for p in ("/etc/hosts", "/etc/tether", "/etc/resolv.conf")] == [1, 1, 1]
    assert d.exec("web", "cat", "/etc/hosts").stdout.startswith(LOCAL)


def test_read_only_rootfs_with_the_mount_points(readonly_rootfs):
    rw, ro = readonly_rootfs
    (rw / "etc" / "tether").mkdir()
    d = Daemon(ro)
    try:
        d.start()
        assert sh("touch", str(ro / "etc" / "x"), check=False).returncode != 0  # really read-only
        d.start_container("db", None, "--expose", "5432", "--no-mounts")
        d.start_container("web", SLEEP, "--link", "db:database", "--no-mounts")
        db = d.container("db")
        assert d.exec("web", "cat", "/etc/hosts").stdout.endswith(f"{db['ip']}\tdatabase db\n")
        assert d.exec("web", "cat", "/etc/tether/env").stdout == "DOCKER_LINK_PORT_DATABASE=5432\n"
        assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db"
    finally:
        d.close()


def test_a_mount_point_that_cannot_be_made_fails_in_one_line_leaving_nothing(readonly_rootfs):
    _, ro = readonly_rootfs  # no /etc/tether, and nothing can create it
    d = Daemon(ro)
    try:
        d.start()
        b = d.bundle("web", serve("web"), "--no-mounts")
        r = d.run("web", b, check=False)
        assert r.returncode != 0
        (line,) = [ln for ln in r.stderr.splitlines() if "tether-hook:" in ln]
        assert "cannot create /etc/tether in the container's root" in line
        assert "Read-only file system" in line and "tether oci patch" in line
        assert d.cli_json("ps", "-a") == []  # forgotten: no record, no lease
        assert bridge_ports(d.bridge) == []
        assert "start of web (id web) failed in its hook: undone" in d.log.read_text()
    finally:
        d.close()


def test_a_target_that_leads_into_proc_is_refused(readonly_rootfs, tmp_path):
    """An image's /etc/hosts that is a symbolic link into the container's /proc
    (CVE-2019-16884's way) gets no mount: one line, nothing left."""
    rw, _ = readonly_rootfs
    (rw / "etc" / "hosts").unlink()
    (rw / "etc" / "hosts").symlink_to("/proc/sys/kernel/hostname")
    (rw / "etc" / "tether").mkdir()
    d = Daemon(rw)
    try:
        d.start()
        r = d.run("web", d.bundle("web", serve("web"), "--no-mounts"), check=False)
        assert r.returncode != 0
        (line,) = [ln for ln in r.stderr.splitlines() if "tether-hook:" in ln]
        assert "/etc/hosts in the container's image leads into /proc or /sys" in line, line
        assert d.cli_json("ps", "-a") == [] and bridge_ports(d.bridge) == []
    finally:
        d.close()
