"""Queries in flight to the upstreams (fused/dns/forward.py): sans-IO, fake time."""
from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from fused.dns.forward import Forwarder, Reply, Send

U1, U2 = ("192.0.2.53", 53), ("192.0.2.54", 5353)
CLIENT = ("10.213.0.2", 40000)


def query(name: str = "outside.example.", qid: int = 4242) -> bytes:
    return dns.message.make_query(name, "A", id=qid).to_wire()


def upstream_answer(sent: Send, address: str = "192.0.2.77", records: int = 1) -> bytes:
    q = dns.message.from_wire(sent.wire)
    r = dns.message.make_response(q)
    for i in range(records):
        r.answer.append(dns.rrset.from_text(f"n{i}.outside.example.", 60, "IN", "A", address))
    return r.to_wire()


def fwd(upstreams=(U1, U2), **kw) -> Forwarder:
    return Forwarder(list(upstreams), timeout=1.0, rng=random.Random(1), **kw)


def test_a_query_goes_to_the_first_upstream_under_an_id_of_its_own_and_back_with_the_clients():
    f = fwd()
    sent = f.start(query(), CLIENT, 512, now=0.0)
    assert isinstance(sent, Send) and sent.to == U1 and sent.wire[2:] == query()[2:]
    reply = f.answer(upstream_answer(sent), U1)
    assert reply.client == CLIENT
    a = dns.message.from_wire(reply.wire)
    assert a.id == 4242 and [rd.address for rrs in a.answer for rd in rrs] == ["192.0.2.77"]
    assert f.pending == {}


def test_two_clients_with_the_same_id_get_their_own_answers():
    f = fwd()
    s1 = f.start(query("a.example."), CLIENT, 512, 0.0)
    s2 = f.start(query("b.example."), ("10.213.0.3", 40000), 512, 0.0)
    assert s1.wire[:2] != s2.wire[:2]
    r2 = f.answer(upstream_answer(s2, "192.0.2.2"), U1)
    r1 = f.answer(upstream_answer(s1, "192.0.2.1"), U1)
    assert r1.client == CLIENT and r2.client == ("10.213.0.3", 40000)
    assert str(dns.message.from_wire(r1.wire).question[0].name) == "a.example."


def test_answers_from_elsewhere_or_with_another_id_are_ignored():
    f = fwd()
    sent = f.start(query(), CLIENT, 512, 0.0)
    good = upstream_answer(sent)
    assert f.answer(good, ("192.0.2.99", 53)) is None  # not an upstream we asked
    assert f.answer(bytes([good[0] ^ 1]) + good[1:], U1) is None  # another id
    assert f.answer(good[:5], U1) is None  # garbage
    assert f.answer(good, U2) is None  # not asked yet
    assert isinstance(f.answer(good, U1), Reply)


def test_an_upstream_that_does_not_answer_in_time_passes_to_the_next_then_servfail():
    f = fwd()
    f.start(query(), CLIENT, 512, 0.0)
    assert f.next_deadline() == 1.0
    assert f.expire(0.9) == []
    (again,) = f.expire(1.0)
    assert isinstance(again, Send) and again.to == U2
    # a late answer from the first one still counts
    late = f.answer(upstream_answer(again), U1)
    assert isinstance(late, Reply) and f.pending == {}
    f.start(query(), CLIENT, 512, 5.0)
    f.expire(6.0)
    (fail,) = f.expire(7.0)
    a = dns.message.from_wire(fail.wire)
    assert fail.client == CLIENT and a.id == 4242 and a.rcode() == dns.rcode.SERVFAIL and f.pending == {}


def test_past_its_capacity_or_with_no_upstream_a_query_fails_at_once():
    f = fwd(capacity=2)
    f.start(query(), CLIENT, 512, 0.0)
    f.start(query(), CLIENT, 512, 0.0)
    full = f.start(query(), CLIENT, 512, 0.0)
    assert isinstance(full, Reply) and dns.message.from_wire(full.wire).rcode() == dns.rcode.SERVFAIL
    none = fwd(upstreams=()).start(query(), CLIENT, 512, 0.0)
    assert isinstance(none, Reply) and dns.message.from_wire(none.wire).rcode() == dns.rcode.SERVFAIL


def test_an_answer_larger_than_the_clients_udp_size_is_truncated():
    f = fwd()
    sent = f.start(query(), CLIENT, 512, 0.0)
    big = upstream_answer(sent, records=60)
    assert len(big) > 512
    a = dns.message.from_wire(f.answer(big, U1).wire)
    assert a.flags & dns.flags.TC and a.id == 4242 and a.answer == []
    sent = f.start(query(), CLIENT, None, 0.0)  # TCP: whole
    assert len(f.answer(upstream_answer(sent, records=60), U1).wire) == len(big)
