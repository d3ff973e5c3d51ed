"""Issue: DNS — per-container A and SRV answers on the bridge, from the link graph."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from harness import Daemon, address_in_hosts, in_netns, serve, sh

SLEEP = ["sleep", "1000000"]


def query(d: Daemon, cid: str, name: str, rdtype: str = "A", tcp: bool = False, **kw) -> dns.message.Message:
    """A dnspython query sent from inside container `cid` to the gateway."""
    q = dns.message.make_query(name, rdtype, **kw)
    send = dns.query.tcp if tcp else dns.query.udp
    return in_netns(d.container(cid)["pid"], lambda: send(q, d.gateway, timeout=3))


def a_of(r: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrs in r.answer if rrs.rdtype == dns.rdatatype.A for rd in rrs)


def srv_of(r: dns.message.Message) -> list[tuple[int, str]]:
    return sorted((rd.port, str(rd.target)) for rrs in r.answer if rrs.rdtype == dns.rdatatype.SRV for rd in rrs)


@pytest.fixture(scope="module")
def dd(rootfs):
    d = Daemon(rootfs, strategy="facade", extra='search = ["tether.test"]')
    try:
        d.start()
        d.start_container("db", serve("db"), "--expose", "5432", "--expose", "5433", "--expose", "53/udp")
        d.start_container("db2", serve("db2"), "--expose", "5432")
        d.start_container("web", SLEEP, "--link", "db:database")
        d.start_container("app", SLEEP, "--link", "db2:database")
        yield d
    finally:
        d.close()


def facade(d, consumer, alias):
    return address_in_hosts((d.run_dir / "fs" / consumer / "hosts").read_text(), alias)


def test_busybox_nslookup_a_and_srv(dd):
    d = dd
    assert (d.run_dir / "fs" / "web" / "resolv.conf").read_text().startswith(f"nameserver {d.gateway}\n")
    out = d.exec("web", "nslookup", "database").stdout
    assert f"Address: {facade(d, 'web', 'database')}" in out
    out = d.exec("web", "nslookup", "-type=srv", "_database._tcp").stdout
    assert "0 0 5432 database" in out and "0 0 5433 database" in out


def test_a_srv_ptr_and_retarget(dd):
    d = dd
    r = query(d, "web", "database.")
    assert a_of(r) == [facade(d, "web", "database")] and r.answer[0].ttl == 0
    assert a_of(query(d, "web", "database.tether.test.")) == [facade(d, "web", "database")]
    assert a_of(query(d, "web", "db2.")) == [d.container("db2")["ip"]]  # any registered name
    assert a_of(query(d, "web", "web.")) == [d.container("web")["ip"]]  # its own name
    r = query(d, "web", "_database._tcp.", "SRV")
    assert srv_of(r) == [(5432, "database."), (5433, "database.")]
    assert [rd.address for rrs in r.additional for rd in rrs] == [facade(d, "web", "database")]
    assert srv_of(query(d, "web", "_database._udp.", "SRV")) == [(53, "database.")]
    assert query(d, "web", "database.", "AAAA").rcode() == dns.rcode.NOERROR  # known name, no data
    assert query(d, "web", "nothing-here.").rcode() == dns.rcode.NXDOMAIN  # no upstreams
    ptr = query(d, "web", dns.reversename.from_address(d.container("db")["ip"]).to_text(), "PTR")
    assert [str(rd.target) for rrs in ptr.answer for rd in rrs] == ["db."]
    ptr = query(d, "web", dns.reversename.from_address(facade(d, "web", "database")).to_text(), "PTR")
    assert [str(rd.target) for rrs in ptr.answer for rd in rrs] == ["database."]
    # the graph changes: the very next answer follows (no reload, no restart)
    d.cli("link", "retarget", "web", "database", "db2")
    try:
        assert srv_of(query(d, "web", "_database._tcp.", "SRV")) == [(5432, "database.")]
        assert a_of(query(d, "web", "database.")) == [facade(d, "web", "database")]
    finally:
        d.cli("link", "retarget", "web", "database", "db")
    assert srv_of(query(d, "web", "_database._tcp.", "SRV")) == [(5432, "database."), (5433, "database.")]


def test_each_consumer_gets_its_own_answer(dd):
    d = dd
    assert facade(d, "web", "database") != facade(d, "app", "database")
    assert a_of(query(d, "web", "database.")) == [facade(d, "web", "database")]
    assert a_of(query(d, "app", "database.")) == [facade(d, "app", "database")]
    assert srv_of(query(d, "app", "_database._tcp.", "SRV")) == [(5432, "database.")]
    # and each reaches its own target through the name
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db"
    assert d.exec("app", "nc", "-w", "3", "database", "5432").stdout.strip() == "db2"


def test_refused_outside_the_bridge_and_only_bound_there(dd):
    d = dd
    q = dns.message.make_query("database.", "A")
    r = dns.query.udp(q, d.gateway, timeout=3)  # from the host itself: not a container
    assert r.rcode() == dns.rcode.REFUSED and not r.answer
    # tether-fused binds the sockets and keeps them; the DNS process answers them
    listening = sh("ss", "-Hlnup").stdout + sh("ss", "-Hlntp").stdout
    for pid in (d.proc.pid, d.pid_of("dns")):
        ours = [line for line in listening.splitlines() if f"pid={pid}," in line]
        assert len(ours) == 2 and all(f"{d.gateway}:53 " in line for line in ours), ours


def test_tcp_and_truncation(rootfs):
    with Daemon(rootfs, strategy="facade") as d:
        d.start()
        ports = [a for p in range(10000, 10120) for a in ("--expose", str(p))]
        d.start_container("big", SLEEP, *ports)
        d.start_container("c", SLEEP, "--link", "big:svc")
        r = query(d, "c", "_svc._tcp.", "SRV")  # no EDNS: 512 bytes at most
        assert r.flags & dns.flags.TC and len(r.to_wire()) <= 512
        r = query(d, "c", "_svc._tcp.", "SRV", use_edns=0, payload=1232)
        assert r.flags & dns.flags.TC and len(r.to_wire()) <= 1232
        r = query(d, "c", "_svc._tcp.", "SRV", tcp=True)
        assert not r.flags & dns.flags.TC and len(srv_of(r)) == 120
        assert a_of(query(d, "c", "svc.", tcp=True)) == [facade(d, "c", "svc")]


UPSTREAM = r"""
import socket, sys, dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    wire, addr = s.recvfrom(4096)
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    if str(q.question[0].name) == "outside.example.":
        r.answer.append(dns.rrset.from_text("outside.example.", 60, "IN", "A", "192.0.2.77"))
    else:
        r.set_rcode(3)
    s.sendto(r.to_wire(), addr)
"""


@pytest.fixture
def upstream_ns():
    """A resolver of the test's own, in a network namespace of its own."""
    from harness import _TAKEN, free_subnet

    tag = "%06x" % random.randrange(1 << 24)
    ns, host_if = f"tup{tag}", f"tu{tag}"
    net = free_subnet(30, range(100, 200), _TAKEN)
    base = net.split("/")[0].rsplit(".", 1)[0]
    last = int(net.split("/")[0].rsplit(".", 1)[1])
    host_ip, ns_ip = f"{base}.{last + 1}", f"{base}.{last + 2}"
    proc = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", UPSTREAM, ns_ip],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        yield ns_ip, proc
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_forwarding_to_an_upstream_and_servfail(rootfs, upstream_ns):
    ns_ip, proc = upstream_ns
    with Daemon(rootfs, strategy="facade", upstreams=[f"{ns_ip}:53"], extra="timeout = 1.0") as d:
        d.start()
        d.start_container("db", SLEEP)
        d.start_container("web", SLEEP, "--link", "db:database")
        r = query(d, "web", "outside.example.")
        assert a_of(r) == ["192.0.2.77"]
        assert query(d, "web", "not.example.").rcode() == dns.rcode.NXDOMAIN  # the upstream's word
        assert a_of(query(d, "web", "database.")) == [facade(d, "web", "database")]  # ours, not forwarded
        assert "192.0.2.77" in d.exec("web", "nslookup", "outside.example").stdout
        proc.kill()
        proc.wait()
        t0 = time.monotonic()
        r = query(d, "web", "outside.example.")
        assert r.rcode() == dns.rcode.SERVFAIL and time.monotonic() - t0 < 2.5


def test_fuzz_does_not_break_the_responder(dd):
    d = dd
    rnd = random.Random(7)
    valid = dns.message.make_query("database.", "A").to_wire()

    def blast():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(10_000):
                kind = i % 3
                if kind == 0:
                    pkt = os.urandom(rnd.randrange(0, 600))
                elif kind == 1:
                    pkt = valid[: rnd.randrange(0, len(valid))]
                else:
                    b = bytearray(valid)
                    for _ in range(rnd.randrange(1, 6)):
                        b[rnd.randrange(len(b))] = rnd.randrange(256)
                    pkt = bytes(b)
                s.sendto(pkt, (d.gateway, 53))
        finally:
            s.close()

    in_netns(d.container("web")["pid"], blast)
    time.sleep(0.5)
    assert d.proc.poll() is None
    assert a_of(query(d, "web", "database.")) == [facade(d, "web", "database")]
    # TCP: garbage closes the connection, the next one is answered
    def tcp_garbage():
        with socket.create_connection((d.gateway, 53), timeout=3) as s:
            s.sendall(b"\x00\x05hello")
            return s.recv(100)

    assert in_netns(d.container("web")["pid"], tcp_garbage) == b""
    assert a_of(query(d, "web", "database.", tcp=True)) == [facade(d, "web", "database")]


def test_a_target_name_resolves_as_in_the_consumers_hosts_file(rootfs):
    """`database db` on web's hosts line: `nslookup db` from web gives that
    line's address, before and after `move db db2` (then db2 does)."""
    with Daemon(rootfs, strategy="facade") as d:
        d.start()
        d.start_container("db", SLEEP, "--expose", "5432")
        d.start_container("db2", SLEEP, "--expose", "5432")
        d.start_container("web", SLEEP, "--link", "db:database")
        hosts = (d.run_dir / "fs" / "web" / "hosts").read_text()
        assert "\tdatabase db\n" in hosts
        assert a_of(query(d, "web", "db.")) == [address_in_hosts(hosts, "database")]
        assert f"Address: {address_in_hosts(hosts, 'database')}" in d.exec("web", "nslookup", "db").stdout
        d.cli("move", "db", "db2")
        hosts = (d.run_dir / "fs" / "web" / "hosts").read_text()
        assert "\tdatabase db2\n" in hosts
        assert a_of(query(d, "web", "db2.")) == [address_in_hosts(hosts, "database")]
        assert a_of(query(d, "web", "db.")) == [d.container("db")["ip"]]  # off web's hosts file now
