"""The DNS process's loops (fused/dns/server.py) on loopback sockets of the
test's own, no root: its channel (hello, publish, hand-over), and the UDP and
TCP loops with the budget in front. A "container" here is 127.0.0.1."""
from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from fused import render
from fused.channel import recv_frame, send_frame
from fused.dns.server import Responder, encode
from fused.graph import Node, Topology
from fused.model import PortSpec

QPS = 20
TOPO = Topology.of({"web": Node("web", "127.0.0.1", True), "db": Node("db", "10.0.0.3", True, (PortSpec(5432, "tcp"),))},
                   [("web", "database", "db", "10.1.0.1", "db")], "facade")


@pytest.fixture
def responder(tmp_path):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    r = Responder(str(tmp_path), udp, tcp, QPS, [], [], 1.0, ["--qps", str(QPS)])
    ours, theirs = socket.socketpair()
    threading.Thread(target=r.client, args=(theirs,), daemon=True).start()
    ours.settimeout(5)
    yield r, ours
    ours.close()
    udp.close()
    tcp.close()


def call(chan: socket.socket, msg: dict, with_fds: bool = False):
    send_frame(chan, msg)
    return recv_frame(chan, with_fds=with_fds)


def publish(chan: socket.socket, seq: int = 1) -> None:
    assert call(chan, {**encode(None, render.dns_data(TOPO)), "seq": seq})[0] == {"seq": seq}


def test_the_channel_says_hello_takes_data_and_hands_its_sockets_over(responder):
    r, chan = responder
    hello, _ = call(chan, {"op": "hello"})
    assert hello["args"] == ["--qps", str(QPS)] and hello["serving"] is False and hello["version"] == r.version
    publish(chan, 7)
    assert call(chan, {"op": "hello"})[0]["serving"] is True and r.seq == 7
    _, fds = call(chan, {"op": "handover"}, with_fds=True)
    got = [socket.socket(fileno=fd) for fd in fds]
    assert [s.getsockname() for s in got] == [r.udp.getsockname(), r.tcp.getsockname()]
    for s in got:
        s.close()
    assert call(chan, {"op": "nonsense"})[0] == {"error": "unknown op 'nonsense'"}


def test_udp_answers_the_budget_refuses_as_much_again_and_drops_the_rest(responder):
    r, chan = responder
    publish(chan)
    threading.Thread(target=r.serve_udp, daemon=True).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(r.udp.getsockname())
    client.settimeout(0.5)
    for i in range(3 * QPS):
        client.send(dns.message.make_query("database.", "A", id=i).to_wire())
    answers = []
    try:
        while True:
            answers.append(dns.message.from_wire(client.recv(4096)))
    except TimeoutError:
        pass
    rcodes = sorted(a.rcode() for a in answers)
    assert rcodes == [dns.rcode.NOERROR] * QPS + [dns.rcode.REFUSED] * QPS
    ok = [a for a in answers if a.rcode() == dns.rcode.NOERROR]
    assert {rd.address for a in ok for rrs in a.answer for rd in rrs} == {"10.1.0.1"}
    assert sorted(a.id for a in answers) == list(range(2 * QPS))  # the first ones, in order of arrival
    client.close()
    r.tick(1.0)  # what the once-a-second line counts, the hello reports
    counters = call(chan, {"op": "hello"})[0]["counters"]
    assert (counters["answered"], counters["over_refused"], counters["over_dropped"]) == (QPS, QPS, QPS)


def test_tcp_is_answered_and_shares_the_budget(responder):
    r, chan = responder
    publish(chan)
    threading.Thread(target=r.serve_tcp, daemon=True).start()
    q = dns.message.make_query("_database._tcp.", "SRV")
    with socket.create_connection(r.tcp.getsockname(), timeout=5) as s:
        wire = q.to_wire()
        s.sendall(len(wire).to_bytes(2, "big") + wire)
        n = int.from_bytes(s.recv(2), "big")
        buf = b""
        while len(buf) < n:
            buf += s.recv(n - len(buf))
    a = dns.message.from_wire(buf)
    assert [(rd.port, str(rd.target)) for rrs in a.answer for rd in rrs] == [(5432, "database.")]
    assert r.budget.buckets["127.0.0.1"][0] == QPS - 1  # one token of the same bucket UDP spends
