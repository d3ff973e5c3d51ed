"""Issue 23, item 4: a full disk under the store is a one-line refusal.
state_dir is a small tmpfs the test mounts, filled with a file: a start, a
retarget and a link add are refused in one line naming the cause, change
nothing, log one line each; running containers keep their files, DNS and
traffic; after freeing space everything works. tether-fused killed -9 (its
WAL left behind) and started again on the full disk starts and serves,
refusing changes until there is space; never a traceback."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import dns.message
import dns.query
import pytest

from harness import Daemon, address_in_hosts, bridge_ports, firewall_state, in_netns, sh, start_web_linked_to_db, wait_for

SLEEP = ["sleep", "1000000"]
TMPFS_SIZE = "8m"


@pytest.fixture
def on_tmpfs(rootfs):
    d = Daemon(rootfs, strategy="facade")
    d.state_dir.mkdir(parents=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(d.state_dir))
    try:
        d.start()
        start_web_linked_to_db(d)
        yield d
    finally:
        d.close()
        sh("umount", "-l", str(d.state_dir), check=False)
        shutil.rmtree(d.dir, ignore_errors=True)


def fill(d: Daemon) -> None:
    """Write a file until the tmpfs has no byte left."""
    with open(d.state_dir / "filler", "ab", buffering=0) as f:
        for chunk in (1 << 16, 512):  # then the last pages a 64 KiB write did not fit in
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    assert os.statvfs(d.state_dir).f_bfree == 0


def cause(d: Daemon) -> str:
    return (f"no space left on tmpfs ({d.state_dir}) for the store {d.state_dir / 'tether.db'}: "
            "free space there or move state_dir")


def one_line(p: subprocess.CompletedProcess, prefix: str) -> str:
    lines = [ln for ln in p.stderr.splitlines() if prefix in ln]
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def state(d: Daemon) -> dict:
    """What a refused change must leave as it was."""
    return {"containers": {c["name"]: (c["state"], c["ip"], c["links"]) for c in d.cli_json("ps", "-a")},
            "links": d.cli_json("link", "ls"), "ports": sorted(bridge_ports(d.bridge)), "rules": firewall_state(d),
            "names": sorted(os.listdir(d.run_dir / "fs"))}


def serving(d: Daemon, target: str = "db") -> None:
    """web's files, DNS and traffic to its link's target."""
    hosts = d.exec("web", "cat", "/etc/hosts").stdout
    assert f"\tdatabase {target}\n" in hosts
    q = dns.message.make_query("database.", "A")
    pid = json.loads(d.runc("state", "web").stdout)["pid"]  # from runc: tether-fused may be down
    r = in_netns(pid, lambda: dns.query.udp(q, d.gateway, timeout=3))
    assert [rd.address for rrs in r.answer for rd in rrs] == [address_in_hosts(hosts, "database")]
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == target


def start_late(d: Daemon, name: str) -> subprocess.CompletedProcess:
    return d.run(name, d.bundle(name, SLEEP), check=False)


def test_a_full_disk_refuses_changes_in_one_line_and_running_containers_keep_serving(on_tmpfs):
    d = on_tmpfs
    fill(d)
    before = state(d)
    log_size = d.log.stat().st_size
    line = one_line(start_late(d, "late"), "tether-hook:")
    assert line.endswith(f"tether-hook: {cause(d)}\\n\"") or line.endswith(f"tether-hook: {cause(d)}"), line
    for args in (("link", "retarget", "web", "database", "db2"), ("link", "add", "web", "db2", "--alias", "other")):
        p = d.cli(*args, check=False)
        assert one_line(p, "tether:") == f"tether: {cause(d)}"
    assert state(d) == before  # nothing changed: no row, veth, rule or served name of any of them
    serving(d)
    log = d.log.read_text()[log_size:]
    assert "Traceback" not in log
    refused = [ln for ln in log.splitlines() if "refused: no space left" in ln]
    assert len(refused) == 3 and all(ln.endswith(cause(d)) for ln in refused), log
    # space again: everything works
    (d.state_dir / "filler").unlink()
    d.cli("link", "retarget", "web", "database", "db2")
    d.cli("link", "add", "web", "db2", "--alias", "other")
    start_late(d, "late2")
    assert d.container("late2")["state"] == "running"
    serving(d, "db2")


def test_a_start_after_kill_9_on_a_full_disk_serves_and_refuses_changes(on_tmpfs):
    """tether-fused killed -9 (its WAL left behind), a container dies while
    it is away, the disk fills: the next start cannot record the death, and
    serves the store as it is, refusing changes, with no traceback."""
    d = on_tmpfs
    d.cli("link", "retarget", "web", "database", "db2")  # something in the WAL
    d.kill9("fused")
    assert (d.state_dir / "tether.db-wal").stat().st_size > 0
    d.kill("db")  # its poststop cannot reach the daemon: the next start finds it dead
    fill(d)
    d.start()
    serving(d, "db2")
    assert {c["name"]: c["state"] for c in d.cli_json("ps", "-a")}["db"] == "running"  # as the store has it
    assert one_line(d.cli("link", "add", "web", "db2", "--alias", "other", check=False), "tether:") == \
        f"tether: {cause(d)}"
    log = d.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert f"reconcile: {cause(d)}; serving the store as it is" in log
    # space again: the liveness check records db's death, and changes go through
    (d.state_dir / "filler").unlink()
    wait_for(lambda: {c["name"]: c["state"] for c in d.cli_json("ps", "-a")}["db"] == "stopped", 10,
             what="db to be marked stopped once there is space")
    d.cli("link", "add", "web", "db2", "--alias", "other")
    d.stop()
    assert "Traceback" not in d.log.read_text()


def test_a_start_on_a_full_disk_that_cannot_read_the_store_refuses_in_one_line(on_tmpfs):
    """The WAL's index (-shm) gone as well: SQLite must write it before it
    can read the store. tether-fused refuses to start in one line; running
    containers keep serving."""
    from harness import FUSED

    d = on_tmpfs
    d.kill9("fused")
    (d.state_dir / "tether.db-shm").unlink()
    fill(d)
    p = subprocess.run([FUSED, "--config", str(d.config)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert one_line(p, "tether-fused:") == f"tether-fused: {cause(d)}"
    serving(d)


def test_a_full_etcd_is_one_line(tmp_path, monkeypatch):
    """etcd past its quota (its NOSPACE alarm: every write refused): the
    etcd store says so in one line naming the endpoint and the way out;
    reads go on."""
    import cluster
    from fused.model import Container
    from fused.store.base import Draft
    from fused.store.etcd import EtcdStore
    from fused.errors import StoreFull

    wrapper = tmp_path / "etcd"  # etcd with a quota of 128 KiB, started as the cluster harness starts it
    wrapper.write_text(f'#!/bin/sh\nexec {cluster.ETCD} --quota-backend-bytes {1 << 17} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(cluster, "ETCD", str(wrapper))
    net, _etcd, endpoint = cluster.etcd_reachable_from_here()
    try:
        s = EtcdStore([endpoint], "/tfull", "h1", "10.0.0.1")
        try:
            with pytest.raises(StoreFull) as ei:
                for i in range(200):
                    d = Draft(s.snapshot())
                    d.put(Container(f"c{i}", "x" * 30000, "stopped", None, None, "/b", 1.0, 2.0, 3.0, "", (), ()))
                    s.commit(d.change, d.snap.revision)
            line = str(ei.value)
            assert line.startswith("etcd at ") and endpoint.split("//")[1] in line and "\n" not in line
            assert "no space left (mvcc: database space exceeded" in line and "etcdctl alarm disarm" in line
            assert len(s.snapshot().containers) == i  # everything before it, and reads go on
        finally:
            s.close()
    finally:
        net.close()
