"""The DNS responder from query bytes to answer bytes (sans-IO: no socket).

Queries are built and answers parsed with dnspython, as a resolver would;
what the answers mean next to the hosts file is in test_dns_answers.py.
"""
from __future__ import annotations

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fused import graph, render
from fused.dns.answer import REFUSED, Answers, Forward, short_answer
from fused.graph import Node, Topology
from fused.model import PortSpec

GATEWAY = "10.213.0.1"
WEB, DB, NS, CACHE = "10.213.0.2", "10.213.0.3", "10.213.0.5", "10.213.0.6"
F_DB, F_NS = "10.214.0.1", "10.214.0.3"

LINKS = [
    ("web", "database", "db", F_DB, "db"),
    ("web", "ns", "ns", F_NS, "ns"),  # alias == target name
]
TOPO = Topology.of(
    {
        "web": Node("web", WEB, True),
        "db": Node("db", DB, True, (PortSpec(5432, "tcp"), PortSpec(5433, "tcp"))),
        "ns": Node("ns", NS, True, (PortSpec(53, "tcp"), PortSpec(53, "udp"), PortSpec(8053, "udp"))),
        "cache": Node("cache", CACHE, False, (PortSpec(6379, "tcp"),)),
    },
    LINKS,
    "facade",
)


def responder(topo: Topology = TOPO, upstreams=(), search=()) -> Answers:
    r = Answers(list(search), forwarding=bool(upstreams))
    r.publish(render.dns_data(topo))
    return r


def exchange(r: Answers, wire: bytes, src: str = WEB) -> bytes | None:
    """What the UDP server sends back for `wire`: None when it drops it or
    forwards it (answer None)."""
    query, answer = r.handle(wire, src)
    if query is None or answer is None:
        return None
    return r.to_wire(query, answer, r.udp_limit(query))


def ask(r: Answers, name: str, rdtype="A", src: str = WEB) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    raw = exchange(r, q.to_wire(), src)
    assert raw is not None, f"{name} {rdtype}: no answer (forwarded or dropped)"
    a = dns.message.from_wire(raw)  # every answer parses
    assert a.id == q.id and a.flags & dns.flags.QR and a.question == q.question
    return a


def records(a: dns.message.Message, section: str = "answer") -> list[tuple[str, str, int, str]]:
    return sorted(
        (rrs.name.to_text(), dns.rdatatype.to_text(rrs.rdtype), rrs.ttl, rd.to_text())
        for rrs in getattr(a, section)
        for rd in rrs
    )


@pytest.mark.parametrize(
    "name, address",
    [
        ("database", F_DB),  # alias: its facade
        ("db", F_DB),  # the target's name, as on the alias's hosts line
        ("ns", F_NS),  # alias == target name
        ("web", WEB),  # own name
        ("cache", CACHE),  # no link: its own address (stopped, the address is sticky)
        ("DataBase", F_DB),  # names are case-insensitive
    ],
)
def test_a_records(name, address):
    a = ask(responder(), name)
    assert a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
    assert records(a) == [(f"{name}.", "A", 0, address)]  # the name as asked: 0x20 survives


def test_a_with_a_search_suffix():
    a = ask(responder(search=["corp.example"]), "database.corp.example")
    assert records(a) == [("database.corp.example.", "A", 0, F_DB)]


def test_other_types_of_a_known_name_are_no_data_not_nxdomain():
    a = ask(responder(), "database", "AAAA")
    assert a.rcode() == dns.rcode.NOERROR and records(a) == []


def test_srv_per_exposed_port_with_the_address_in_additional():
    a = ask(responder(), "_database._tcp", "SRV")
    assert records(a) == [
        ("_database._tcp.", "SRV", 0, "0 0 5432 database."),
        ("_database._tcp.", "SRV", 0, "0 0 5433 database."),
    ]
    assert records(a, "additional") == [("database.", "A", 0, F_DB)]


def test_srv_splits_a_target_exposing_tcp_and_udp():
    r = responder()
    assert records(ask(r, "_ns._tcp", "SRV")) == [("_ns._tcp.", "SRV", 0, "0 0 53 ns.")]
    assert records(ask(r, "_ns._udp", "SRV")) == [
        ("_ns._udp.", "SRV", 0, "0 0 53 ns."),
        ("_ns._udp.", "SRV", 0, "0 0 8053 ns."),
    ]


def test_srv_for_a_protocol_the_target_does_not_expose_is_no_data_and_parses():
    # it once held an SRV record with no rdata: a FormError for every resolver
    a = ask(responder(), "_database._udp", "SRV")
    assert a.rcode() == dns.rcode.NOERROR
    assert records(a) == [] and records(a, "additional") == []


def test_srv_for_an_alias_the_consumer_does_not_have_is_nxdomain():
    # even with upstreams: _alias._proto is tether's
    a = ask(responder(upstreams=[("192.0.2.53", 53)]), "_cache._tcp", "SRV")
    assert a.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("address, name", [(WEB, "web."), (DB, "db."), (F_DB, "database."), (F_NS, "ns.")])
def test_ptr_for_container_and_facade_addresses(address, name):
    rev = dns.reversename.from_address(address).to_text()
    assert records(ask(responder(), rev, "PTR")) == [(rev, "PTR", 0, name)]


def test_ptr_of_an_address_tether_does_not_hold():
    rev = dns.reversename.from_address("192.0.2.7").to_text()
    assert exchange(responder(upstreams=[("192.0.2.53", 53)]), dns.message.make_query(rev, "PTR").to_wire()) is None
    assert ask(responder(), rev, "PTR").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("name", ["nosuch", "example.com", "_x._tcp.example.com"])
def test_nxdomain_with_no_upstreams(name):
    a = ask(responder(), name)
    assert a.rcode() == dns.rcode.NXDOMAIN and records(a) == []
    assert a.flags & dns.flags.RA


@pytest.mark.parametrize("name", ["nosuch", "example.com"])
def test_unknown_names_are_forwarded_when_there_are_upstreams(name):
    r = responder(upstreams=[("192.0.2.53", 53)])
    query, answer = r.handle(dns.message.make_query(name, "A").to_wire(), WEB)
    assert query is not None and answer is None


def test_every_record_has_ttl_0():
    # the link graph can change under any answer
    r = responder()
    answers = [ask(r, n, t) for n, t in [("database", "A"), ("_database._tcp", "SRV"), ("_ns._udp", "ANY")]]
    answers.append(ask(r, dns.reversename.from_address(F_DB).to_text(), "PTR"))
    ttls = {rrs.ttl for a in answers for rrs in [*a.answer, *a.additional]}
    assert ttls == {0}


@pytest.mark.parametrize("src", ["10.213.0.99", "127.0.0.1", GATEWAY])
def test_a_query_from_an_unknown_source_is_refused(src):
    r = responder()
    for name, rdtype in [("database", "A"), ("_database._tcp", "SRV"), ("example.com", "A")]:
        a = ask(r, name, rdtype, src=src)
        assert a.rcode() == dns.rcode.REFUSED and records(a) == []
    assert r.counters["refused"] == 3


def test_a_container_without_links_is_known_by_its_address():
    # cache is registered (stopped, address kept): it asks and is answered
    a = ask(responder(), "web", src=CACHE)
    assert records(a) == [("web.", "A", 0, WEB)]
    assert ask(responder(), "database", src=CACHE).rcode() == dns.rcode.NXDOMAIN  # web's alias, not cache's


def _query(name="database") -> bytes:
    return dns.message.make_query(name, "A").to_wire()


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12",
        _query()[:11],  # a header cut short
        _query()[:-3],  # a question cut short
        _query() + b"\x00junk",  # trailing bytes
        b"\xff" * 64,
        bytes(12) + b"\xc0\x0c\x00\x01\x00\x01",  # a compression pointer loop
        dns.message.make_response(dns.message.make_query("database", "A")).to_wire(),  # a response (QR)
    ],
)
def test_malformed_packets_are_dropped(wire):
    r = responder()
    assert r.handle(wire, WEB) == (None, None)
    assert exchange(r, wire) is None
    assert r.counters["dropped"] == 2


def test_a_second_question_or_another_opcode_is_not_implemented():
    r = responder()
    q = dns.message.make_query("database", "A")
    q.question.append(dns.message.make_query("web", "A").question[0])
    assert dns.message.from_wire(exchange(r, q.to_wire())).rcode() == dns.rcode.NOTIMP
    q = dns.message.make_query("database", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(exchange(r, q.to_wire())).rcode() == dns.rcode.NOTIMP


def test_another_class_is_refused():
    q = dns.message.make_query("database", "A", rdclass=dns.rdataclass.CH)
    assert dns.message.from_wire(exchange(responder(), q.to_wire())).rcode() == dns.rcode.REFUSED


def test_localhost_is_the_loopback_address():
    # as the hosts file's first line says; once NXDOMAIN (no upstreams) or
    # whatever an upstream made of it
    assert records(ask(responder(), "localhost")) == [("localhost.", "A", 0, "127.0.0.1")]
    q = dns.message.make_query("localhost", "A").to_wire()
    assert exchange(responder(upstreams=[("192.0.2.53", 53)]), q) is not None  # answered, not forwarded


def test_localhost_stays_loopback_with_an_alias_or_a_container_of_that_name():
    # the hosts file has 127.0.0.1 localhost first: a hosts lookup answers it,
    # and so does DNS (tether refuses the alias elsewhere; here: defence in depth)
    topo = Topology.of(
        TOPO.nodes | {"localhost": Node("localhost", "10.213.0.9", True)},
        [*LINKS, ("web", "localhost", "db", "10.214.0.9", "db")],
        "facade",
    )
    hosts = render.hosts(graph.views(topo)["web"]).decode()
    assert hosts.splitlines()[0] == "127.0.0.1\tlocalhost" and "10.214.0.9\tlocalhost db" in hosts
    r = responder(topo)
    assert records(ask(r, "localhost")) == [("localhost.", "A", 0, "127.0.0.1")]
    assert records(ask(r, "localhost", src="10.213.0.9")) == [("localhost.", "A", 0, "127.0.0.1")]


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp():
    ports = tuple(PortSpec(p, "tcp") for p in range(10000, 10100))
    topo = TOPO._replace(nodes=TOPO.nodes | {"db": Node("db", DB, True, ports)})
    r = responder(topo)
    q = dns.message.make_query("_database._tcp", "SRV")
    query, answer = r.handle(q.to_wire(), WEB)
    udp = r.to_wire(query, answer, r.udp_limit(query))
    assert len(udp) <= 512
    short = dns.message.from_wire(udp)
    assert short.flags & dns.flags.TC and short.answer == []
    whole = dns.message.from_wire(r.to_wire(query, answer, 65535))
    assert len(whole.answer[0]) == 100 and not whole.flags & dns.flags.TC
    # EDNS raises the UDP limit
    q = dns.message.make_query("_database._tcp", "SRV", use_edns=0, payload=4096)
    query, answer = r.handle(q.to_wire(), WEB)
    assert not dns.message.from_wire(r.to_wire(query, answer, r.udp_limit(query))).flags & dns.flags.TC


def test_a_new_graph_is_answered_from_the_next_query():
    r = responder()
    assert records(ask(r, "db")) == [("db.", "A", 0, F_DB)]
    moved = TOPO._replace(groups={**TOPO.groups, "db": "cache"})  # a move: the group's target
    r.publish(render.dns_data(moved))
    # db left web's hosts file: its own address, as for anyone
    assert records(ask(r, "db")) == [("db.", "A", 0, DB)]
    assert records(ask(r, "_database._tcp", "SRV")) == [("_database._tcp.", "SRV", 0, "0 0 6379 database.")]


# --- the budget's REFUSED, made of the header and question bytes alone ------------
@pytest.mark.parametrize("name, rdtype", [("database", "A"), ("_database._tcp", "SRV"), ("x" * 63 + ".example", "AAAA")])
def test_a_short_answer_is_the_query_refused(name, rdtype):
    q = dns.message.make_query(name, rdtype, use_edns=0)
    a = dns.message.from_wire(short_answer(q.to_wire(), REFUSED))
    assert a.id == q.id and a.flags & dns.flags.QR and a.flags & dns.flags.RD
    assert a.rcode() == dns.rcode.REFUSED and a.question == q.question
    assert a.answer == a.authority == a.additional == [] and a.edns < 0


def test_a_short_answer_keeps_the_opcode_and_leaves_out_a_question_it_cannot_delimit():
    q = dns.message.make_query("database", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(short_answer(q.to_wire(), REFUSED)).opcode() == dns.opcode.NOTIFY
    two = dns.message.make_query("database", "A")
    two.question.append(dns.message.make_query("web", "A").question[0])
    for wire in (two.to_wire(), _query()[:-3], bytes(12) + b"\xc0\x0c\x00\x01\x00\x01"):
        a = dns.message.from_wire(short_answer(wire, REFUSED))
        assert a.question == [] and a.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("wire", [b"", b"\x12" * 11,
                                  dns.message.make_response(dns.message.make_query("database", "A")).to_wire()])
def test_no_short_answer_to_what_is_no_query(wire):
    assert short_answer(wire, REFUSED) is None  # too short, or a response: never answered


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_short_answer_fuzzed(wire):
    out = short_answer(wire, REFUSED)
    if out is None:
        assert len(wire) < 12 or wire[2] & 0x80
        return
    a = dns.message.from_wire(out)  # whatever came in, what goes out parses
    assert a.id == int.from_bytes(wire[:2], "big") and a.rcode() == dns.rcode.REFUSED and len(a.question) <= 1


# --- the whole of answering, fuzzed: bytes in, bytes (or forward, or nothing) out -----
@settings(max_examples=300, deadline=None)
@given(st.sampled_from([("database", "A"), ("_database._tcp", "SRV"), ("nosuch", "A"), ("web", "AAAA"),
                        (dns.reversename.from_address(DB).to_text(), "PTR")]),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.sampled_from([WEB, CACHE, "10.213.0.99"]), st.booleans())
def test_respond_fuzzed(question, flips, src, forwarding):
    wire = bytearray(dns.message.make_query(*question).to_wire())
    for at, byte in flips:
        if at < len(wire):
            wire[at] = byte
    r = responder(upstreams=[("192.0.2.53", 53)] if forwarding else ())
    out = r.respond(bytes(wire), src)
    if out is None or isinstance(out, Forward):
        assert out is None or forwarding
        return
    a = dns.message.from_wire(out)
    assert a.id == int.from_bytes(wire[:2], "big") and a.flags & dns.flags.QR and len(out) <= 512
