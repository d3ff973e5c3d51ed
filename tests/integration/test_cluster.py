"""Several hosts (DESIGN "Multi-host"): each host a network namespace of the
test's own with its own tether-fused (its own run_dir, state_dir, bridge and
chain prefix), one address space in one etcd (a throwaway one, listening on
the underlay of the test's namespaces only), the hosts' bridges joined by
VXLAN. All traffic stays among these namespaces."""
from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import time

import dns.message
import dns.query
import dns.rdatatype
import pytest

from cluster import Cluster
from fused.model import overlay_name
from harness import BUSYBOX, address_in_hosts, host_port, in_netns, serve, sh, wait_for

SLEEP = ["sleep", "1000000"]


@pytest.fixture(scope="module")
def cluster(rootfs):
    c = Cluster(rootfs, n=3, strategy="facade")
    try:
        c.start()
        c["h1"].start_container("web", serve("web"), "--expose", "5432")
        c["h3"].start_container("web2", serve("web2"), "--expose", "5432")
        c["h2"].start_container("app", SLEEP, "--link", "web:db")
        c["h3"].start_container("app3", SLEEP, "--link", "web:db")
        c["h1"].start_container("app1", SLEEP, "--link", "web:db")
        yield c
    finally:
        c.close()


def nc(d, cid: str, host: str, port: int = 5432) -> str:
    """What `host`:port answers, from inside container `cid`."""
    p = d.exec(cid, "sh", "-c", f"nc -w 2 {host} {port} </dev/null", check=False)
    return p.stdout.strip()


def hosts_of(d, name: str) -> str:
    return (d.run_dir / "fs" / name / "hosts").read_text()


def srv(d, cid: str, name: str) -> list[tuple[int, str]]:
    q = dns.message.make_query(name, "SRV")
    r = in_netns(d.container(cid)["pid"], lambda: dns.query.udp(q, d.gateway, timeout=3))
    return sorted((rd.port, str(rd.target)) for rrs in r.answer if rrs.rdtype == dns.rdatatype.SRV for rd in rrs)


def test_one_address_space_and_links_across_hosts(cluster):
    """app (h2) links to web (h1): by address through the overlay, by its
    alias (the facade, DNAT'ed on app's host), by SRV port from app's host."""
    h1, h2 = cluster["h1"], cluster["h2"]
    web_ip = h1.container("web")["ip"]
    assert h2.container("web")["ip"] == web_ip and h2.container("web")["host"] == "h1"
    ips = [cluster[h].container(n)["ip"] for h, n in (("h1", "web"), ("h3", "web2"), ("h2", "app"), ("h3", "app3"),
                                                       ("h1", "app1"))]
    assert len(set(ips)) == 5
    assert nc(h2, "app", web_ip) == "web"
    assert nc(h2, "app", "db") == "web"
    assert nc(h2, "app", "web") == "web"  # the target's own name, on the alias's line
    assert srv(h2, "app", "_db._tcp") == [(5432, "db.")]


def count_arp_in(d) -> None:
    """A counter of the ARP frames the overlay brings into host `d` (a table
    of the test's own, in that host's namespace)."""
    vx = overlay_name(d.bridge)
    nft = ["ip", "netns", "exec", d.netns, "nft"]
    sh(*nft, "add", "table", "netdev", "tether_test_arp")
    sh(*nft, "add", "chain", "netdev", "tether_test_arp", "in",
       f'{{ type filter hook ingress device "{vx}" priority 0; }}')
    sh(*nft, "add", "rule", "netdev", "tether_test_arp", "in", "arp", "operation", "request", "counter")


def arp_in(d) -> int:
    out = sh("ip", "netns", "exec", d.netns, "nft", "-j", "list", "table", "netdev", "tether_test_arp").stdout
    return next(x["rule"]["expr"][-1]["counter"]["packets"] for x in json.loads(out)["nftables"] if "rule" in x)


def test_the_gateway_is_one_address_and_one_mac_answered_on_each_host(cluster):
    """An anycast gateway: every bridge has the gateway's address and MAC;
    ARP for it, and for a container on another host, is answered on the
    asking container's host, and no ARP request crosses the overlay."""
    macs = {json.loads(sh("ip", "-n", d.netns, "-j", "link", "show", "dev", d.bridge).stdout)[0]["address"]
            for d in cluster.daemons.values()}
    assert len(macs) == 1
    h1, h2, h3 = cluster["h1"], cluster["h2"], cluster["h3"]
    for d in (h1, h3):
        count_arp_in(d)
    web_ip = h1.container("web")["ip"]
    pid = h2.container("app")["pid"]
    for ip in (h2.gateway, web_ip):  # from app's netns (arping needs a raw socket, which app may not open)
        p = sh("nsenter", f"--net=/proc/{pid}/ns/net", BUSYBOX, "arping", "-b", "-c", "3", "-w", "2", "-I", "eth0",
               ip, check=False)
        assert "Received 3 response" in p.stdout, p.stdout + p.stderr
    assert (arp_in(h1), arp_in(h3)) == (0, 0)


def test_big_transfers_cross_the_overlay(cluster):
    """Frames as large as a container sends fit the overlay (its MTU is the
    overlay's): 200 KiB each way between hosts, by address."""
    h1, h2 = cluster["h1"], cluster["h2"]
    h1.start_container("bulk", ["sh", "-c", "while true; do head -c 204800 /dev/zero | nc -l -p 6000; done"])
    try:
        ip = h1.container("bulk")["ip"]
        p = h2.exec("app", "sh", "-c", f"sleep 3 | nc {ip} 6000 | wc -c", check=False)
        assert p.stdout.strip() == "204800", p.stdout + p.stderr
        assert h2.exec("app", "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    finally:
        h1.kill("bulk")


def test_move_to_a_container_on_a_third_host_while_the_consumers_run(cluster):
    h1, h2, h3 = cluster["h1"], cluster["h2"], cluster["h3"]
    facade = address_in_hosts(hosts_of(h2, "app"), "db")
    r = h1.cli_json("move", "web", "web2")
    assert r["links"] == 3
    # every host's consumers follow: files and traffic, at the facade they cached
    for d, consumer in ((h2, "app"), (h3, "app3")):
        wait_for(lambda: "\tdb web2\n" in hosts_of(d, consumer), 5, what=f"{consumer}'s hosts to name web2")
        assert address_in_hosts(hosts_of(d, consumer), "db") == (facade if d is h2 else address_in_hosts(hosts_of(h3, "app3"), "db"))
        wait_for(lambda: nc(d, consumer, "db") == "web2", 5, what=f"{consumer} to reach web2 through db")
    h3.cli_json("move", "web2", "web")
    wait_for(lambda: nc(h2, "app", "db") == "web", 5, what="app to reach web again")


def test_a_move_on_another_host_cuts_the_flows_tracked_here(cluster):
    """app's flows through its facade are tracked on app's host: a move made
    on h1 cuts them on h2, and the next datagram goes to the new target."""
    h1, h2 = cluster["h1"], cluster["h2"]
    web_ip = h1.container("web")["ip"]
    facade = address_in_hosts(hosts_of(h2, "app"), "db")
    h2.exec("app", "sh", "-c", "echo x | nc -u -w 1 db 5432", check=False)
    flows = lambda: sh("ip", "netns", "exec", h2.netns, "conntrack", "-L", "-d", facade, check=False).stdout  # noqa: E731
    assert web_ip in flows()
    h1.cli("move", "web", "web2")
    try:
        wait_for(lambda: web_ip not in flows(), 5, what="h2 to cut app's flow to web")
    finally:
        h1.cli("move", "web2", "web")


def test_a_change_on_one_host_shows_in_files_on_another(cluster):
    """A link added on h1 for a consumer on h2: h2's daemon serves it."""
    h1, h2 = cluster["h1"], cluster["h2"]
    t0 = time.monotonic()
    h1.cli("link", "add", "app", "web2", "--alias", "second")
    wait_for(lambda: "second" in hosts_of(h2, "app"), 5, what="h2 to serve app's new link")
    print(f"seen on h2 after {(time.monotonic() - t0) * 1000:.0f} ms (including the CLI's start)")
    assert nc(h2, "app", "second") == "web2"
    h2.cli("link", "rm", "app", "second")
    wait_for(lambda: "second" not in hosts_of(h2, "app"), 5, what="the link to go")


def test_a_sticky_address_follows_a_container_to_another_host(cluster):
    """web stops on h1 and starts on h2: the same address and MAC; consumers
    on h1, h2 and h3 reach it where they cached it, with nothing done there."""
    h1, h2, h3 = cluster["h1"], cluster["h2"], cluster["h3"]
    before = h1.container("web")
    h1.kill("web")
    wait_for(lambda: h2.container("web")["state"] == "stopped", 5, what="web stopped everywhere")
    h2.start_container("web", serve("web"), "--expose", "5432")
    after = h2.container("web")
    assert (after["ip"], after["mac"], after["host"]) == (before["ip"], before["mac"], "h2")
    for d, consumer in ((h1, "app1"), (h2, "app"), (h3, "app3")):
        wait_for(lambda: nc(d, consumer, before["ip"]) == "web", 5, what=f"{consumer} to reach web at {before['ip']}")
        assert nc(d, consumer, "db") == "web"
    # and back to h1
    h2.kill("web")
    h1.start_container("web", serve("web"), "--expose", "5432")
    assert h1.container("web")["ip"] == before["ip"]
    wait_for(lambda: nc(h3, "app3", "db") == "web", 5, what="app3 to reach web on h1 again")


def doctor(d) -> dict[str, dict]:
    from harness import TETHER

    p = sh(*d.nsenter, TETHER, "--config", str(d.config), "doctor", "--json", check=False, timeout=60)
    return {r["name"]: r for r in json.loads(p.stdout)}


def test_doctor_checks_etcd_and_the_overlay(cluster):
    r = doctor(cluster["h2"])
    assert r["store"]["status"] == "ok" and "live hosts h1, h2, h3" in r["store"]["detail"], r["store"]
    assert r["overlay"]["status"] == "ok" and "2 other host(s): h1, h3" in r["overlay"]["detail"], r["overlay"]


def test_a_host_port_forwards_on_the_host_its_container_runs_on(cluster):
    h1, h2 = cluster["h1"], cluster["h2"]
    h1.start_container("pub", serve("pub"), "--publish", "5432")
    try:
        port = host_port(h1.container("pub")["published"][0])
        u1, u2 = (cluster.net.address(h) for h in ("h1", "h2"))

        def from_h2(addr: str) -> str:  # a client on host h2 itself (its namespace), not in a container
            p = sh("ip", "netns", "exec", h2.netns, BUSYBOX, "nc", "-w", "2", addr, str(port), check=False)
            return p.stdout.strip()

        assert from_h2(u1) == "pub"  # through h1's address: h1 forwards it
        assert from_h2(u2) == ""  # h2 does not: pub does not run there
    finally:
        h1.kill("pub")


def test_a_name_running_on_one_host_is_refused_on_another(cluster):
    h2 = cluster["h2"]
    p = h2.run("web", h2.bundle("web", serve("web"), "--expose", "5432"), check=False)
    assert p.returncode != 0 and "already used by running container" in p.stderr


def test_three_hosts_start_50_containers_each_at_once(rootfs):
    """Compare-and-swap under contention: no address or host port taken
    twice, every conflict planned again (and logged)."""
    with Cluster(rootfs, n=3, strategy="direct", ports=200) as c:
        c.start()

        def start(host: str) -> None:
            d = c[host]
            for i in range(50):
                d.start_container(f"{host}c{i}", SLEEP, "--publish", "8080")

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(start, ["h1", "h2", "h3"]))
        rows = c["h1"].cli_json("ps")
        assert len(rows) == 150 and all(r["state"] == "running" for r in rows)
        ips = [r["ip"] for r in rows]
        assert len(set(ips)) == 150
        ports = [p for r in rows for p in r["published"]]
        assert len(ports) == 150 and len(set(ports)) == 150
        retried = sum(len(re.findall(r"planned again|attempt \d+ of", d.log.read_text())) for d in c.daemons.values())
        print(f"conflicts retried: {retried}")
        assert retried > 0  # they did contend


def test_a_dead_hosts_containers_count_as_stopped_and_keep_their_leases(rootfs):
    with Cluster(rootfs, n=2, strategy="direct", lease_ttl=2) as c:
        c.start()
        h1, h2 = c["h1"], c["h2"]
        h2.start_container("lost", serve("lost"), "--expose", "5432")
        h1.start_container("peer", serve("peer"), "--expose", "5432")
        ip = h1.container("lost")["ip"]
        h2.kill9("fused")
        # h1 keeps serving its own
        assert (h1.run_dir / "fs" / "peer" / "hosts").read_text()
        wait_for(lambda: h1.container("lost")["state"] == "stopped", 15, what="h2's lease to expire")
        assert h1.container("lost")["ip"] == ip  # sticky
        assert "its host h2 is gone" in h1.log.read_text()
        assert nc(h1, "peer", ip) == "lost"  # it runs on, its daemon away: still reached
        h1.start_container("newcomer", SLEEP)
        assert h1.container("newcomer")["ip"] != ip  # a free address first: lost's is taken only when none is
        # h2 comes back with lost still running there (its overlay device gone
        # too, as after a reboot of that host's network): running again, where
        # it was, and the overlay's entries written again at start
        sh("ip", "-n", h2.netns, "link", "del", overlay_name(h2.bridge))
        h2.start()
        wait_for(lambda: h1.container("lost")["state"] == "running", 10, what="lost to run again")
        assert h1.container("lost")["ip"] == ip and h1.container("lost")["host"] == "h2"
        wait_for(lambda: nc(h1, "peer", ip) == "lost", 5, what="peer on h1 to reach lost on h2 again")
        peer_ip = h1.container("peer")["ip"]
        wait_for(lambda: nc(h2, "lost", peer_ip) == "peer", 5, what="lost on h2 to reach peer on h1")


def test_etcd_away_a_start_fails_in_one_line_and_running_containers_keep_working(rootfs):
    with Cluster(rootfs, n=2, strategy="facade") as c:
        c.start()
        h1, h2 = c["h1"], c["h2"]
        h1.start_container("db", serve("db"), "--expose", "5432")
        h2.start_container("app", SLEEP, "--link", "db:database")
        wait_for(lambda: nc(h2, "app", "database") == "db", 5, what="app to reach db")
        c.etcd.kill()
        p = h2.run("late", h2.bundle("late", SLEEP), check=False)
        assert p.returncode != 0
        line = [ln for ln in p.stderr.splitlines() if "etcd" in ln]
        assert line and c.etcd.endpoint in line[0], p.stderr
        ports = sh("ip", "-n", h2.netns, "-o", "link", "show", "master", h2.bridge).stdout
        assert len([ln for ln in ports.splitlines() if "-vx" not in ln]) == 1, ports  # app's veth only: nothing half-done
        r = doctor(h2)["store"]
        assert r["status"] == "fail" and c.etcd.endpoint in r["detail"], r
        # running containers: files and traffic
        assert "database" in hosts_of(h2, "app")
        assert nc(h2, "app", "database") == "db"
        c.etcd.start()
        wait_for(lambda: h2.run("late2", h2.bundle("late2", SLEEP), check=False).returncode == 0, 15,
                 interval=0.5, what="a start to work with etcd back")
        # a change made on one host after etcd came back shows on the other
        h1.cli("link", "add", "app", "db", "--alias", "again")
        wait_for(lambda: "again" in hosts_of(h2, "app"), 5, what="h2 to follow h1's change")


def test_a_host_cut_off_from_etcd_catches_up_when_it_is_back(rootfs):
    """h2 loses the underlay (etcd and the other hosts) while h1 changes
    what h2's consumer sees; when h2 is back, it applies it."""
    with Cluster(rootfs, n=2, strategy="facade", lease_ttl=30) as c:
        c.start()
        h1, h2 = c["h1"], c["h2"]
        h1.start_container("db", serve("db"), "--expose", "5432")
        h1.start_container("db2", serve("db2"), "--expose", "5432")
        h2.start_container("app", SLEEP, "--link", "db:database")
        sh("ip", "-n", h2.netns, "link", "set", "u0", "down")
        try:
            h1.cli("move", "db", "db2")
            time.sleep(1)
            assert "\tdatabase db\n" in hosts_of(h2, "app")  # h2 cannot know yet: it serves what it had
        finally:
            sh("ip", "-n", h2.netns, "link", "set", "u0", "up")
        wait_for(lambda: "\tdatabase db2\n" in hosts_of(h2, "app"), 15, interval=0.1, what="h2 to catch up")
        wait_for(lambda: nc(h2, "app", "database") == "db2", 5, what="app to reach db2")


@pytest.mark.parametrize("section,bad,needle", [
    ("store", 'endpoints = ["http://127.0.0.1:9"]', "etcd is unreachable at http://127.0.0.1:9"),
    ("store", 'prefix = "tether/"', "prefix 'tether/'"),
    ("cluster", 'host = "Not_A_Label"', "not an RFC 1123 label"),
])
def test_bad_cluster_settings_are_one_line_at_start(rootfs, tmp_path, section, bad, needle):
    from harness import FUSED

    cfg = tmp_path / "t.toml"
    body = {"store": 'backend = "etcd"\n', "cluster": 'underlay = "10.0.0.1"\n'}
    body[section] += bad + "\n"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\nrun_dir = "{tmp_path}/r"\n[network]\nbridge = "tbbad0"\n'
                   f'[store]\n{body["store"]}timeout = 0.5\n[cluster]\n{body["cluster"]}')
    err = tmp_path / "err"
    with open(err, "w") as f:  # a file: the file server it started keeps its stderr open
        rc = subprocess.run([FUSED, "--config", str(cfg)], stdout=f, stderr=f, stdin=subprocess.DEVNULL, timeout=30).returncode
    sh(FUSED, "--config", str(cfg), "--cleanup", check=False)
    assert rc != 0
    lines = [ln for ln in err.read_text().splitlines() if ln.startswith("tether-fused:")]
    assert len(lines) == 1 and needle in lines[0], err.read_text()
