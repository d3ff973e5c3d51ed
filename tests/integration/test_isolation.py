"""Issue 14: links as the security boundary (`[network] isolation = "links"`).

Real containers on an isolated bridge, real traffic with busybox nc: a
consumer reaches a link target on its exposed ports only, nothing else passes
between containers, and a retarget moves what is allowed with the DNAT.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import dns.message
import dns.query
import dns.rdatatype
import pytest

from harness import Daemon, address_in_hosts, host_port, in_netns, tcp_get, wait_for

SLEEP = ["sleep", "1000000"]


def servers(name: str, *ports: int) -> list[str]:
    """Answers its name (and the port) on each TCP port."""
    *rest, last = ports
    bg = "".join(f"nc -ll -p {p} -e echo {name}:{p} & " for p in rest)
    return ["sh", "-c", f"{bg}exec nc -ll -p {last} -e echo {name}:{last}"]


def ask(d: Daemon, cid: str, host: str, port: int) -> str:
    """From inside `cid`: a new TCP connection, what it answered ("" when refused)."""
    return d.exec(cid, "nc", "-w", "3", host, str(port), check=False).stdout.strip()


def ip_of(d: Daemon, name: str) -> str:
    return d.container(name)["ip"]


def facade_of(d: Daemon, consumer: str, alias: str) -> str:
    return address_in_hosts((d.run_dir / "fs" / consumer / "hosts").read_text(), alias)


def ping(d: Daemon, cid: str, ip: str) -> bool:
    """One ICMP echo from inside `cid` (a raw socket of the test, in its
    netns: runc's default capabilities give busybox ping no raw socket)."""

    def echo() -> bool:
        ident = os.getpid() & 0xFFFF
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"tether"
        csum = sum(struct.unpack("!%dH" % (len(body) // 2), body))
        csum = (csum >> 16) + (csum & 0xFFFF)
        packet = body[:2] + struct.pack("!H", ~(csum + (csum >> 16)) & 0xFFFF) + body[4:]
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.settimeout(2)
            s.sendto(packet, (ip, 0))
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    data, (src, _) = s.recvfrom(1500)
                except TimeoutError:
                    return False
                hl = (data[0] & 0xF) * 4
                if src == ip and data[hl] == 0 and struct.unpack_from("!H", data, hl + 4)[0] == ident:
                    return True
        return False

    return in_netns(d.container(cid)["pid"], echo)


@pytest.fixture(scope="module", params=["nftables", "iptables"])
def iso(rootfs, request):
    d = Daemon(rootfs, driver=request.param, strategy="facade", isolation="links")
    try:
        d.start()
        for db in ("db", "db2"):  # 22 listens too, but is not exposed
            d.start_container(db, servers(db, 22, 5432), "--expose", "5432", "--publish", "5432")
        d.start_container("web", servers("web", 80), "--expose", "80", "--link", "db:database")
        d.start_container("x", servers("x", 80), "--expose", "80")
        yield d
    finally:
        d.close()


def test_a_consumer_reaches_its_target_on_exposed_ports_only(iso):
    d = iso
    db = ip_of(d, "db")
    assert ask(d, "web", "database", 5432) == "db:5432"  # by facade
    assert ask(d, "web", db, 5432) == "db:5432"  # by the target's own address
    assert ask(d, "web", db, 22) == ""  # listening, not exposed
    assert ask(d, "web", facade_of(d, "web", "database"), 22) == ""
    assert ask(d, "x", db, 5432) == ""  # no link
    assert ask(d, "web", ip_of(d, "x"), 80) == ""
    assert ask(d, "db", ip_of(d, "db2"), 5432) == ""
    assert ping(d, "web", db)  # ICMP between a linked pair
    assert not ping(d, "x", db)


def test_a_link_is_one_way_until_there_is_one_back(iso):
    d = iso
    web = ip_of(d, "web")
    assert ask(d, "db", web, 80) == ""
    d.cli("link", "add", "db", "web")
    try:
        assert ask(d, "db", web, 80) == "web:80"
        assert ask(d, "db", "web", 80) == "web:80"  # its own facade
        assert ask(d, "web", "database", 5432) == "db:5432"
    finally:
        d.cli("link", "rm", "db", "web")
    assert ask(d, "db", web, 80) == ""


def test_published_ports_dns_and_the_host_still_work(iso):
    d = iso
    hp = host_port(d.container("db")["published"][0])
    for via in ("127.0.0.1", d.gateway):
        assert wait_for(lambda: _try(via, hp), timeout=5, what=f"{via}:{hp}").strip() == "db:5432"
    q = dns.message.make_query("database", "A")
    r = in_netns(d.container("web")["pid"], lambda: dns.query.udp(q, d.gateway, timeout=3))
    assert [rd.address for rrs in r.answer if rrs.rdtype == dns.rdatatype.A for rd in rrs] == [facade_of(d, "web", "database")]


def _try(ip: str, port: int) -> str | None:
    try:
        return tcp_get(ip, port, timeout=2) or None
    except OSError:
        return None


def test_a_retarget_moves_what_is_allowed_with_the_dnat(iso):
    d = iso
    db, db2 = ip_of(d, "db"), ip_of(d, "db2")
    d.cli("link", "retarget", "web", "database", "db2")
    try:
        assert ask(d, "web", "database", 5432) == "db2:5432"
        assert ask(d, "web", db2, 5432) == "db2:5432"
        assert ask(d, "web", db, 5432) == ""
    finally:
        d.cli("link", "retarget", "web", "database", "db")
    assert ask(d, "web", db, 5432) == "db:5432"
    assert ask(d, "web", db2, 5432) == ""


def test_without_isolation_everything_reaches_everything(rootfs):
    with Daemon(rootfs, driver="nftables", strategy="facade") as d:
        d.start()
        d.start_container("a", servers("a", 22, 80), "--expose", "80")
        d.start_container("b", servers("b", 22, 80))
        a, b = ip_of(d, "a"), ip_of(d, "b")
        assert ask(d, "b", a, 22) == "a:22"
        assert ask(d, "a", b, 80) == "b:80"
        assert ping(d, "a", b)


def test_isolation_holds_through_kill_9_of_tether_fused_and_its_restart(iso):
    d = iso
    db = ip_of(d, "db")
    d.kill9("fused")
    assert ask(d, "web", "database", 5432) == "db:5432"  # the kernel keeps the rules
    assert ask(d, "x", db, 5432) == ""
    d.start()
    assert ask(d, "web", "database", 5432) == "db:5432"
    assert ask(d, "x", db, 5432) == ""
    assert ask(d, "web", db, 22) == ""


def test_doctor_says_isolation_holds_and_names_a_bridge_that_stopped_filtering(iso):
    d = iso

    def line() -> dict:
        items = json.loads(d.cli("--json", "doctor", check=False).stdout)
        return next(i for i in items if i["name"] == "isolation")

    assert line()["status"] == "ok" and "only along links" in line()["detail"]
    knob = f"/sys/class/net/{d.bridge}/bridge/nf_call_iptables"
    with open(knob, "w") as f:
        f.write("0")
    try:
        bad = line()
        assert bad["status"] == "fail" and "does not pass its traffic to the firewall" in bad["detail"]
        assert "restart tether-fused" in bad["fix"]
    finally:
        with open(knob, "w") as f:
            f.write("1")
