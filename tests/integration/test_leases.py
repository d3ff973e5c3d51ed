"""Issue: sticky addresses, proven in real runc containers."""
from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import HOOK, Daemon, bridge_ports, serve, sh, tcp_get, wait_for

SLEEP = ["sleep", "1000000"]


def inside_addr(d: Daemon, cid: str) -> tuple[str, str]:
    mac = d.exec(cid, "cat", "/sys/class/net/eth0/address").stdout.strip()
    out = d.exec(cid, "ip", "-4", "-o", "addr", "show", "eth0").stdout.split()
    return out[out.index("inet") + 1].split("/")[0], mac


def test_tcp_between_containers(daemon):
    daemon.start_container("db")
    daemon.start_container("client", SLEEP)
    db = daemon.container("db")
    assert db["state"] == "running"
    got = daemon.exec("client", "nc", "-w", "3", db["ip"], "5432").stdout
    assert got.strip() == "db"
    # and the host reaches it through the bridge
    assert tcp_get(db["ip"], 5432).strip() == "db"


def test_stop_start_keeps_ip_and_mac(daemon):
    b = daemon.start_container("sticky", SLEEP)
    first = inside_addr(daemon, "sticky")
    assert first == (daemon.container("sticky")["ip"], daemon.container("sticky")["mac"])
    daemon.kill("sticky")
    assert daemon.container("sticky")["state"] == "stopped"
    assert daemon.container("sticky")["stopped_at"]
    # podman's ps: running ones, -a all, -q names, --filter state=
    assert "sticky" not in daemon.cli("ps", "-q").stdout.split()
    assert "sticky" in daemon.cli("ps", "-a", "-q").stdout.split()
    assert "sticky" in daemon.cli("ps", "-q", "--filter", "state=stopped").stdout.split()
    assert [c["state"] for c in daemon.cli_json("ps", "--filter", "name=sticky")] == []
    assert [c["state"] for c in daemon.cli_json("ps", "-a", "--filter", "name=sticky")] == ["stopped"]
    r = daemon.cli("ps", "--filter", "state=exited", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "state=stopped" in r.stderr
    daemon.run("sticky", b)
    assert inside_addr(daemon, "sticky") == first
    daemon.start_container("other", SLEEP)
    assert daemon.container("other")["ip"] != first[0]


def test_rm_frees_lease(daemon):
    b = daemon.start_container("gone", SLEEP)
    ip = daemon.container("gone")["ip"]
    r = daemon.cli("rm", "gone", check=False)
    assert r.returncode == 1 and "running" in r.stderr and "stop it first" in r.stderr
    daemon.kill("gone")
    daemon.cli("rm", "gone")
    assert ip not in [l["lease"] for l in daemon.cli_json("leases")]
    assert "gone" not in [c["name"] for c in daemon.cli_json("ps", "-a")]
    r = daemon.cli("rm", "gone", check=False)
    assert r.returncode == 1 and "no container named 'gone'" in r.stderr
    # a fresh start under the name works again
    daemon.run("gone", b)
    assert daemon.container("gone")["state"] == "running"


def test_create_runtime_twice_registers_once(daemon):
    b = daemon.bundle("twice", SLEEP)
    spec = json.loads((b / "config.json").read_text())
    entry = dict(spec["hooks"]["createRuntime"][0])
    entry["args"] = entry["args"][:-1] + ["prestart"]
    spec["hooks"]["prestart"] = [entry]
    (b / "config.json").write_text(json.dumps(spec))
    before = set(bridge_ports(daemon.bridge))
    daemon.run("twice", b)
    links = daemon.exec("twice", "ip", "-o", "link").stdout.splitlines()
    assert sorted(l.split(":")[1].strip().split("@")[0] for l in links) == ["eth0", "lo"]
    assert len(set(bridge_ports(daemon.bridge)) - before) == 1
    assert [c["name"] for c in daemon.cli_json("ps", "-a")].count("twice") == 1


def test_parallel_30(rootfs):
    with Daemon(rootfs) as d:
        d.start()
        names = [f"p{i}" for i in range(30)]
        bundles = {n: d.bundle(n, serve(n)) for n in names}
        with ThreadPoolExecutor(30) as ex:
            list(ex.map(lambda n: d.run(n, bundles[n]), names))
        ps = {c["name"]: c for c in d.cli_json("ps")}
        ips = [ps[n]["ip"] for n in names]
        assert len(set(ips)) == 30
        assert all(ps[n]["state"] == "running" for n in names)
        for n in names:
            assert wait_for(lambda: _try_get(ps[n]["ip"]), what=f"{n} reachable").strip() == n
        assert len(bridge_ports(d.bridge)) == 30


def _try_get(ip):
    try:
        return tcp_get(ip, 5432, timeout=1)
    except OSError:
        return None


def test_pool_eviction_lru_and_exhaustion(rootfs):
    with Daemon(rootfs, prefix=29) as d:  # 5 usable addresses
        d.start()
        bundles = {}
        for i in range(1, 6):
            bundles[f"c{i}"] = d.start_container(f"c{i}", SLEEP)
        ip = {n: d.container(n)["ip"] for n in bundles}
        assert len(set(ip.values())) == 5
        d.kill("c2")
        d.kill("c4")  # c2 stopped first
        bundles["c6"] = d.start_container("c6", SLEEP)
        assert d.container("c6")["ip"] == ip["c2"]
        c2 = d.container("c2")
        assert c2["ip"] is None and "evicted" in c2["note"] and "c6" in c2["note"]
        assert d.container("c4")["ip"] == ip["c4"]  # not touched
        # c2 comes back: a new address, the only one left is c4's (stopped)
        d.run("c2", bundles["c2"])
        assert d.container("c2")["ip"] == ip["c4"]
        assert inside_addr(d, "c2")[0] == ip["c4"]
        # every address held by a running container now
        before = d.cli_json("ps", "-a")
        ports_before = bridge_ports(d.bridge)
        b7 = d.bundle("c7", SLEEP)
        r = d.run("c7", b7, check=False)
        assert r.returncode != 0
        assert "address pool exhausted" in r.stderr
        assert d.cli_json("ps", "-a") == before
        assert bridge_ports(d.bridge) == ports_before
        assert d.state("c7") in (None, "stopped")


def test_daemon_restart_keeps_leases_and_reconciles(rootfs):
    with Daemon(rootfs) as d:
        d.start()
        d.start_container("r1", SLEEP)
        d.start_container("r2", SLEEP)
        b3 = d.start_container("r3", SLEEP)
        d.kill("r3")
        table = d.cli("ps", "-a").stdout
        ps = d.cli_json("ps", "-a")
        assert "r3" in table and [c["state"] for c in ps if c["name"] == "r3"] == ["stopped"]
        d.stop()
        d.start()
        assert d.cli_json("ps", "-a") == ps
        assert d.cli("ps", "-a").stdout == table
        # a container that stops while the daemon is down: poststop cannot
        # reach it (the hook warns, the stop goes on), the restart notices.
        d.stop()
        d.kill("r2")
        assert d.state("r2") is None
        d.start()
        r2 = d.container("r2")
        assert r2["state"] == "stopped" and r2["ip"] == [c for c in ps if c["name"] == "r2"][0]["ip"]
        assert d.container("r1")["state"] == "running"
        assert tcp_get_ok(d, "r1")
        d.run("r3", b3)
        assert d.container("r3")["ip"] == [c for c in ps if c["name"] == "r3"][0]["ip"]


def tcp_get_ok(d, cid):
    return d.exec(cid, "ip", "-o", "link", "show", "eth0").returncode == 0


def _hook(d: Daemon, stage: str, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([HOOK, "--config", str(d.config), stage], input=stdin, capture_output=True, timeout=20)


@pytest.fixture
def netns_proc():
    p = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _one_line_error(r, *words):
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode != 0, err
    lines = [l for l in err.strip().splitlines() if "tether-hook" in l or not l.startswith(("time=", "ERRO"))]
    assert lines, err
    for w in words:
        assert w in err, (w, err)


def test_bad_input_changes_nothing(daemon, netns_proc):
    daemon.start_container("stable", SLEEP)
    before, ports = daemon.cli_json("ps", "-a"), bridge_ports(daemon.bridge)
    good = {"ociVersion": "1.0.2", "id": "x1", "status": "created", "pid": netns_proc.pid, "bundle": "/nonexistent"}

    r = _hook(daemon, "createRuntime", b"{not json")
    _one_line_error(r, "not valid JSON")
    assert len(r.stderr.decode().strip().splitlines()) == 1
    r = _hook(daemon, "bogus", json.dumps(good).encode())
    _one_line_error(r, "unknown stage", "createRuntime")
    for bad in ("a\nb", "Web", "x" * 64, "has space", "../x"):
        state = dict(good, annotations={"io.tether.name": bad})
        r = _hook(daemon, "createRuntime", json.dumps(state).encode())
        _one_line_error(r, "io.tether.name", "RFC 1123")
        assert len(r.stderr.decode().strip().splitlines()) == 1
    # bad annotations through runc: the runtime reports the hook's error
    b = daemon.bundle("upper", SLEEP)
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"]["io.tether.name"] = "Upper"
    (b / "config.json").write_text(json.dumps(spec))
    r = daemon.run("upper", b, check=False)
    assert r.returncode != 0 and "io.tether.name" in r.stderr
    assert daemon.cli("oci", "patch", str(b), "--name", "Upper", check=False).returncode == 1
    assert daemon.cli_json("ps", "-a") == before
    assert bridge_ports(daemon.bridge) == ports


def test_hook_with_daemon_down_names_the_socket(rootfs, netns_proc):
    with Daemon(rootfs) as d:  # never started
        state = {"id": "y", "pid": netns_proc.pid, "bundle": "/nonexistent", "annotations": {}}
        r = _hook(d, "createRuntime", json.dumps(state).encode())
        err = r.stderr.decode()
        assert r.returncode == 1 and str(d.sock) in err and "tether-fused" in err
        assert len(err.strip().splitlines()) == 1
        r = _hook(d, "poststop", json.dumps(state).encode())
        assert r.returncode == 0


def test_two_daemons_side_by_side(daemon, rootfs):
    daemon.start_container("side", SLEEP)
    mine = daemon.container("side")
    with Daemon(rootfs) as other:
        other.start()
        other.start_container("side", SLEEP)  # same name, other daemon
        theirs = other.container("side")
        assert theirs["ip"] != mine["ip"]
        assert set(bridge_ports(other.bridge)).isdisjoint(bridge_ports(daemon.bridge))
        for prefix in (daemon.chain_prefix, other.chain_prefix):
            assert f"-N {prefix}-POSTROUTING" in sh("iptables-legacy", "-t", "nat", "-S").stdout
    # the other one is gone, with all it made; ours is intact
    assert other.chain_prefix not in sh("iptables-legacy", "-t", "nat", "-S").stdout
    assert other.chain_prefix not in sh("iptables-legacy", "-S").stdout
    assert sh("ip", "link", "show", other.bridge, check=False).returncode != 0
    assert f"-N {daemon.chain_prefix}-POSTROUTING" in sh("iptables-legacy", "-t", "nat", "-S").stdout
    assert daemon.container("side")["state"] == "running"
    assert daemon.exec("side", "ip", "-o", "link", "show", "eth0").returncode == 0


def test_rm_takes_many_names(daemon):
    for n in ("many-a", "many-b"):
        daemon.start_container(n, SLEEP)
        daemon.kill(n)
    r = daemon.cli("rm", "many-a", "nobody", "many-b", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "tether: nobody: no container named 'nobody': see `tether ps`"
    assert r.stdout.count("removed many-") == 2
    names = [c["name"] for c in daemon.cli_json("ps", "-a")]
    assert "many-a" not in names and "many-b" not in names
