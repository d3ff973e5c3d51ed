"""`tether doctor` against a real daemon: up, stopped, its mount gone or stale,
a running container's files dead."""
from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import TETHER, Daemon, sh, wait_for

KEYS = {"name", "ok", "status", "detail", "fix"}
NAMES = {
    "config", "user", "kernel-fuse", "dev-fuse", "fusermount3", "kernel-veth",
    "kernel-bridge", "kernel-nat", "iptables", "forwarding", "bridge", "daemon", "store", "overlay", "mount", "file-server",
    "containers", "firewall", "isolation", "dns", "conntrack", "podman-hooks", "drift",
}  # fmt: skip


def doctor(d, *extra: str, env: dict | None = None):
    p = sh(TETHER, "--config", str(d.config), *extra, "doctor", check=False, timeout=30, env=env)
    return p


def lines_of(p) -> dict[str, str]:
    """name -> its line (status, name, detail[: fix]); the summary is left out."""
    body = p.stdout.splitlines()[:-1]
    return {ln[6:20].strip(): ln for ln in body}


def test_all_usable_with_the_daemon_up(daemon):
    daemon.start_container("db")
    p = doctor(daemon)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = lines_of(p)
    assert set(lines) == NAMES
    for ln in lines.values():
        assert ln.startswith(("ok    ", "warn  ")), ln
    assert f"{daemon.bridge} is up with {daemon.gateway}/" in lines["bridge"]
    assert lines["daemon"].startswith("ok") and "1 running" in lines["daemon"]
    assert lines["mount"].startswith("ok") and "fuse.tether" in lines["mount"]
    assert lines["containers"].startswith("ok") and "1 running container(s) read what tether serves" in lines["containers"]
    assert lines["firewall"].startswith("ok") and f"{daemon.chain_prefix}-*" in lines["firewall"]
    assert p.stdout.splitlines()[-1].startswith(f"{len(NAMES)} checks: ")
    assert "0 failed: tether is usable" in p.stdout.splitlines()[-1]

    pj = doctor(daemon, "--json")
    assert pj.returncode == 0
    items = json.loads(pj.stdout)
    assert {i["name"] for i in items} == NAMES
    for i in items:
        assert set(i) == KEYS
        assert i["ok"] is True and i["status"] in ("ok", "warn")
        assert isinstance(i["detail"], str) and i["detail"]
        if i["status"] == "warn":
            assert i["fix"]


def test_with_the_nftables_driver_the_doctor_asks_the_driver(rootfs):
    """driver = "nftables": doctor reads tether's table through the driver
    (chains, link groups, elements), says `iptables -S` does not show it, and
    fails with the fix when someone deleted the table."""
    from harness import Daemon

    with Daemon(rootfs, driver="nftables", strategy="facade") as d:
        d.start()
        d.start_container("db", None, "--expose", "5432")
        d.start_container("web", None, "--link", "db:database")
        lines = lines_of(doctor(d))
        assert lines["firewall"].startswith("ok") and f"table inet {d.chain_prefix}: 5 base chains, 1 link group" in lines["firewall"]
        assert "1 links" in lines["firewall"]
        assert lines["iptables"].startswith("ok") and f"nft list table inet {d.chain_prefix}" in lines["iptables"]
        assert lines["kernel-nat"].startswith("ok") and "nftables" in lines["kernel-nat"]
        d.stop()
        sh("nft", "delete", "table", "inet", d.chain_prefix)
        line = lines_of(doctor(d))["firewall"]
        assert line.startswith("FAIL") and "restart) tether-fused" in line


def test_the_host_iptables_backend_versus_tethers(daemon):
    backend = sh("iptables", "-V").stdout
    line = lines_of(doctor(daemon))["iptables"]
    if "nf_tables" in backend:
        assert line.startswith("warn") and "iptables-legacy -t nat -S" in line
    else:
        assert line.startswith("ok") and "legacy" in line


def test_daemon_stopped_fails_on_the_socket_with_the_fix(daemon):
    daemon.stop()
    try:
        p = doctor(daemon)
        assert p.returncode == 1, p.stdout
        lines = lines_of(p)
        assert lines["daemon"] == (
            f"FAIL  daemon        no socket at {daemon.sock}: "
            "start it with `systemctl start tether-fused` or `tether-fused --config FILE`"
        )
        # the files outlive the daemon: the file server keeps serving them
        assert lines["mount"].startswith("ok") and "fuse.tether" in lines["mount"], lines["mount"]
        assert lines["file-server"].startswith("ok") and str(daemon.pid_of("fsd")) in lines["file-server"]
        # the store is still there and readable without the daemon
        assert lines["store"].startswith("ok"), lines["store"]
        # and says which containers run, whose files are read all the same
        assert lines["containers"].startswith("ok") and "(the store (the daemon did not answer))" in lines["containers"]
        items = json.loads(doctor(daemon, "--json").stdout)
        bad = {i["name"] for i in items if not i["ok"]}
        assert bad == {"daemon"} or bad - {"daemon"} <= {"bridge", "iptables", "dns", "firewall"}, bad
        assert "store" not in bad and "mount" not in bad
        assert next(i for i in items if i["name"] == "daemon")["fix"].startswith("start it with")
    finally:
        daemon.start()
    assert doctor(daemon).returncode == 0


def test_mount_detached_under_a_running_daemon_fails_on_the_mount(daemon):
    fs = daemon.run_dir / "fs"
    sh("umount", "-l", str(fs))
    try:
        p = doctor(daemon)
        assert p.returncode == 1, p.stdout
        lines = lines_of(p)
        assert lines["mount"].startswith(f"FAIL  mount         nothing is mounted at {fs}: "), lines["mount"]
        assert "start" in lines["mount"]
        assert lines["daemon"].startswith("ok")  # only the mount is named
        assert [n for n, ln in lines.items() if ln.startswith("FAIL")] == ["mount"]
    finally:
        daemon.stop()
        daemon.start()
    assert doctor(daemon).returncode == 0


def test_stale_mount_of_a_killed_daemon_is_named_and_does_not_hang(daemon):
    fs = daemon.run_dir / "fs"
    # every process that holds the FUSE connection dies (no systemd fd store here)
    keeper = int((daemon.run_dir / "keeper.pid").read_text().split()[0])
    daemon.kill9("fused")
    daemon.kill9("fsd")
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{keeper}"), 10, what="the keeper to die")
    try:
        p = doctor(daemon)
        assert p.returncode == 1, p.stdout
        lines = lines_of(p)
        assert lines["mount"].startswith(f"FAIL  mount         stale mount at {fs}: "), lines["mount"]
        assert "not connected" in lines["mount"] and "start tether-fused again" in lines["mount"]
        # the socket file is left behind, but nobody listens
        assert lines["daemon"].startswith("FAIL") and "not listening" in lines["daemon"], lines["daemon"]
    finally:
        daemon.start()
    # a new mount: running containers' files stay dead (the old connection),
    # and doctor says so, until they restart
    running = [c["name"] for c in daemon.cli_json("ps")]
    if running:
        lines = lines_of(doctor(daemon))
        assert [n for n, ln in lines.items() if ln.startswith("FAIL")] == ["containers"], lines
        assert "an older FUSE connection" in lines["containers"] and running[0] in lines["containers"]
        for name in running:
            daemon.kill(name)
            daemon.start_container(name)
    wait_for(lambda: doctor(daemon).returncode == 0, timeout=10, what="doctor ok after restart")


def test_podman_hooks_is_checked_where_podman_reads_them(daemon, tmp_path):
    """podman reads hooks.d files only from containers.conf's hooks_dir (else
    /usr/share/containers/oci/hooks.d): doctor reads the same files, and
    `tether oci hooks-dir` with no DIR writes there."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed: `make test` installs it")
    reads = tmp_path / "reads"
    conf = tmp_path / "containers.conf"
    conf.write_text(f'[engine]\nhooks_dir = ["{reads}"]\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def line() -> str:
        return lines_of(doctor(daemon, env=env))["podman-hooks"]

    assert line() == (
        f"warn  podman-hooks  podman will not run tether's hook: no tether hooks.d file in {reads}: "
        f"run `tether oci hooks-dir --config {daemon.config}` if you run containers with podman"
    )
    # another config's hooks: podman would run those, not this daemon's
    other = tmp_path / "other.toml"
    other.write_text("")
    sh(TETHER, "--config", str(other), "oci", "hooks-dir", env=env)
    assert line().startswith("warn") and f"--config {other}" in line() and "not this config" in line()
    out = sh(TETHER, "--config", str(daemon.config), "oci", "hooks-dir", env=env).stdout
    assert out.splitlines() == [f"wrote {reads}/tether-createruntime.json", f"wrote {reads}/tether-poststop.json"]
    assert line() == f"ok    podman-hooks  podman reads tether's hook from {reads}/tether-createruntime.json"


SLEEP = ["sleep", "1000000"]


@contextmanager
def fuse_connections():
    """/sys/fs/fuse/connections (fusectl), mounted for the test if it is not."""
    where = Path("/sys/fs/fuse/connections")
    mounted = False
    if not os.path.ismount(where):
        sh("mount", "-t", "fusectl", "fusectl", str(where))
        mounted = True
    try:
        yield where
    finally:
        if mounted:
            sh("umount", str(where), check=False)


def connection_of(d: Daemon) -> str:
    """The device number ("0:N") of the FUSE connection at the daemon's mount."""
    from fused import container_files as cf

    with open("/proc/self/mountinfo") as f:
        return cf.mounts_of(f.read())[str(cf.host_mount(d.run_dir))].device


def test_a_running_container_whose_files_are_dead_is_named(rootfs):
    """A running container whose served files are dead (its FUSE connection
    aborted): doctor exits 1 naming it, ps warns and still prints its table.
    Then the upgrade from a release without the separate file server: every
    holder of the connection gone, a new tether-fused mounts anew; the host's
    mount works, the containers' files stay dead and are named, until each
    restarts. Its own daemon: a dead mount is no state to hand on."""
    with Daemon(rootfs) as d:
        d.start()
        d.start_container("web", SLEEP)
        d.start_container("db", SLEEP)
        assert doctor(d).returncode == 0
        old = connection_of(d)
        with fuse_connections() as conns:
            (conns / old.split(":")[1] / "abort").write_text("1")
        r = d.exec("web", "cat", "/etc/hosts", check=False)
        assert r.returncode != 0 and "not connected" in r.stderr

        p = doctor(d)
        assert p.returncode == 1, p.stdout
        line = lines_of(p)["containers"]
        assert line.startswith("FAIL  containers    2 running container(s) with dead served files: db, web (db: "
                               "/etc/hosts: Transport endpoint is not connected: its files come from tether's mount"), line
        assert "restart tether-fused first" in line
        ps = d.cli("ps", check=False)
        assert ps.returncode == 0 and [ln.split()[0] for ln in ps.stdout.splitlines()] == ["NAME", "db", "web"]
        for name in ("db", "web"):
            assert f"tether: warning: {name}: served files dead: /etc/hosts: Transport endpoint is not connected" in ps.stderr
            assert f"runc kill {name} KILL; runc delete {name}" in ps.stderr
        items = d.cli_json("ps")
        assert {c["name"]: c["served_files"]["state"] for c in items} == {"db": "dead", "web": "dead"}

        # every process holding the connection dies; the next tether-fused mounts anew
        keeper = int((d.run_dir / "keeper.pid").read_text().split()[0])
        fsd = int((d.run_dir / "fsd.pid").read_text())
        d.kill9("fused")
        for pid in (keeper, fsd):
            d.pids.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not os.path.exists(f"/proc/{keeper}"), 10, what="the keeper to die")
        d.start()
        assert connection_of(d) != old
        p = doctor(d)
        lines = lines_of(p)
        assert p.returncode == 1 and lines["mount"].startswith("ok"), p.stdout
        assert [n for n, ln in lines.items() if ln.startswith("FAIL")] == ["containers"], p.stdout
        line = lines["containers"]
        assert f"its files come from an older FUSE connection ({old}; the mount at " in line, line
        assert "restart tether-fused first" not in line and "runc kill db KILL; runc delete db" in line

        # restarted, each reads the new mount; until then the other is still named
        d.kill("web")
        d.start_container("web", SLEEP)
        assert "\tweb\n" in d.exec("web", "cat", "/etc/hosts").stdout
        line = lines_of(doctor(d))["containers"]
        assert line.startswith("FAIL  containers    1 running container(s) with dead served files: db (db: "), line
        assert "web" not in line.split("(db:")[0]
        d.kill("db")
        d.start_container("db", SLEEP)
        p = doctor(d)
        assert p.returncode == 0, p.stdout
        assert lines_of(p)["containers"].startswith("ok    containers    2 running container(s) read what tether serves")
        assert "warning" not in d.cli("ps").stderr


def test_a_file_server_that_hangs_does_not_hang_doctor_or_ps(daemon):
    """SIGSTOP the file server: every read of the mount waits. doctor and ps
    give each container's files a bounded time, name them, and return."""
    import time

    if not [c for c in daemon.cli_json("ps") if c["state"] == "running"]:
        daemon.start_container("db")
    fsd = daemon.pid_of("fsd")
    os.kill(fsd, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        p = doctor(daemon)
        took = time.monotonic() - t0
        line = lines_of(p)["containers"]
        assert p.returncode == 1 and line.startswith("FAIL  containers    1 running container(s) with dead served files"), p.stdout
        assert "no answer within 2.5 s" in line, line
        t0 = time.monotonic()
        ps = daemon.cli("ps", check=False)
        took_ps = time.monotonic() - t0
        assert ps.returncode == 0 and "served files dead" in ps.stderr and "no answer within" in ps.stderr, ps.stderr
        print(f"\nfile server stopped: doctor returned in {took:.1f} s, ps in {took_ps:.1f} s")
        assert took < 25 and took_ps < 10
    finally:
        os.kill(fsd, signal.SIGCONT)
    wait_for(lambda: doctor(daemon).returncode == 0, timeout=15, what="doctor ok once the file server runs again")
