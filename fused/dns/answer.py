"""Sans-IO answering: a query's bytes and the asking address in, the answer's
bytes out, or "forward it to the upstreams", or nothing (malformed: dropped).

It answers from the DnsData tether-fused published last (replaced whole on
every change: the next query sees it) and knows the asking container by its
source address; a query from any other source is REFUSED. Names tether does
not know are for the upstreams (NXDOMAIN when there are none). No socket and
no clock: the DNS process (server.py) does the I/O; the tests and the fuzzer
call it directly. Wire format: dnspython, after the budget let the query in;
`short_answer` builds an answer from the header and question bytes alone.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.reversename

from ..render import DnsData

log = logging.getLogger("tether.dns")

TTL = 0  # every answer can change with the link graph
UDP_DEFAULT = 512
UDP_MAX = 4096
REFUSED = 5
SERVFAIL = 2


class Forward(NamedTuple):
    """Not tether's name: ask the upstreams, and answer with theirs."""

    wire: bytes  # the query as it came
    limit: int | None  # the client's UDP size; None over TCP


class Answers:
    def __init__(self, search: list[str], forwarding: bool) -> None:
        """`forwarding`: there are upstreams (else unknown names are NXDOMAIN)."""
        self.suffixes = [dns.name.from_text(s) for s in search]
        self.forwarding = forwarding
        self.data = DnsData({}, {}, {})
        self.counters = {"answered": 0, "forwarded": 0, "refused": 0, "dropped": 0}

    def publish(self, data: DnsData) -> None:
        self.data = data

    def respond(self, wire: bytes, src: str, tcp: bool = False) -> bytes | Forward | None:
        """The answer's bytes (within the query's UDP size unless `tcp`), a
        Forward, or None: malformed, dropped."""
        query, answer = self.handle(wire, src)
        if query is None:
            return None
        limit = None if tcp else self.udp_limit(query)
        if answer is None:
            self.counters["forwarded"] += 1
            return Forward(wire, limit)
        self.counters["answered"] += 1
        return self.to_wire(query, answer, limit)

    def _strip_suffix(self, qname: dns.name.Name, labels: int) -> dns.name.Name:
        """`qname` without a configured search suffix, when it has `labels`
        labels before it."""
        for suffix in self.suffixes:
            if qname.is_subdomain(suffix) and len(qname) == len(suffix) + labels:
                return qname.relativize(suffix).derelativize(dns.name.root)
        return qname

    def _local_name(self, qname: dns.name.Name) -> str | None:
        """The single label a query is about: `db.` or `db.<search suffix>.`"""
        qname = self._strip_suffix(qname, 1)
        if len(qname.labels) == 2:  # ("db", "")
            return qname.labels[0].decode("ascii", "replace").lower()
        return None

    def resolve(self, msg: dns.message.Message, src: str) -> dns.message.Message | None:
        """The answer to `msg` from `src`, or None: forward it upstream."""
        resp = dns.message.make_response(msg)
        resp.flags |= dns.flags.RA | dns.flags.AA
        if msg.opcode() != dns.opcode.QUERY or len(msg.question) != 1:
            resp.set_rcode(dns.rcode.NOTIMP)
            return resp
        links = self.data.links.get(src)
        if links is None:
            resp.set_rcode(dns.rcode.REFUSED)
            self.counters["refused"] += 1
            return resp
        q = msg.question[0]
        qname, qtype = q.name, q.rdtype
        if q.rdclass != dns.rdataclass.IN:
            resp.set_rcode(dns.rcode.REFUSED)
            return resp
        # _alias._tcp / _alias._udp (with or without a search suffix)
        srv = self._srv_parts(qname)
        if srv is not None:
            alias, proto = srv
            link = links.get(alias)
            if link is None:
                return self._unknown(resp)
            ports = sorted(p.port for p in link.ports if p.proto == proto)
            # no port of that protocol: NOERROR with no data (an empty rrset
            # would go on the wire as one record with no rdata: malformed)
            if ports and qtype in (dns.rdatatype.SRV, dns.rdatatype.ANY):
                target = dns.name.from_text(alias)
                rrs = resp.find_rrset(resp.answer, qname, dns.rdataclass.IN, dns.rdatatype.SRV, create=True)
                for p in ports:
                    rrs.add(dns.rdata.from_text("IN", "SRV", f"0 0 {p} {target}"), TTL)
                add = resp.find_rrset(resp.additional, target, dns.rdataclass.IN, dns.rdatatype.A, create=True)
                add.add(dns.rdata.from_text("IN", "A", link.address), TTL)
            return resp
        # PTR
        if qname.is_subdomain(dns.reversename.ipv4_reverse_domain) and qtype in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            try:
                addr = dns.reversename.to_address(qname)
            except (dns.exception.SyntaxError, ValueError):
                addr = None
            target = self.data.ptr.get(addr) if addr else None
            if target is None:
                return None  # not ours: forward
            rrs = resp.find_rrset(resp.answer, qname, dns.rdataclass.IN, dns.rdatatype.PTR, create=True)
            rrs.add(dns.rdata.from_text("IN", "PTR", f"{target}."), TTL)
            return resp
        name = self._local_name(qname)
        if name is None:
            return None
        # the address its hosts file gives, for every name on it (a link's
        # target too); other containers by their own address
        addr = self.data.hosts.get(src, {}).get(name) or self.data.names.get(name)
        if addr is None:
            return self._unknown(resp) if not self.forwarding else None
        if qtype in (dns.rdatatype.A, dns.rdatatype.ANY):
            rrs = resp.find_rrset(resp.answer, qname, dns.rdataclass.IN, dns.rdatatype.A, create=True)
            rrs.add(dns.rdata.from_text("IN", "A", addr), TTL)
        return resp  # other types of a name we know: NOERROR, no data

    def _srv_parts(self, qname: dns.name.Name) -> tuple[str, str] | None:
        labels = self._strip_suffix(qname, 2).labels
        if len(labels) == 3 and labels[0].startswith(b"_") and labels[1].lower() in (b"_tcp", b"_udp"):
            return labels[0][1:].decode("ascii", "replace").lower(), labels[1][1:].decode().lower()
        return None

    def _unknown(self, resp: dns.message.Message) -> dns.message.Message:
        resp.set_rcode(dns.rcode.NXDOMAIN)
        return resp

    def handle(self, wire: bytes, src: str) -> tuple[dns.message.Message | None, dns.message.Message | None]:
        """(query, answer); answer None: forward; query None: malformed, drop."""
        try:
            msg = dns.message.from_wire(wire)
        except Exception:  # anything malformed: dropped, never answered
            self.counters["dropped"] += 1
            return None, None
        if msg.flags & dns.flags.QR:
            self.counters["dropped"] += 1
            return None, None
        try:
            answer = self.resolve(msg, src)
        except Exception:
            log.exception("answering %s failed", msg.question)
            answer = dns.message.make_response(msg)
            answer.set_rcode(dns.rcode.SERVFAIL)
        if answer is None and not self.forwarding:
            answer = self._unknown(dns.message.make_response(msg))
            answer.flags |= dns.flags.RA
        return msg, answer

    @staticmethod
    def to_wire(query: dns.message.Message, answer: dns.message.Message, limit: int | None) -> bytes:
        """Encode within `limit` bytes (UDP): truncated (TC) when it does not fit."""
        if limit is None:
            return answer.to_wire()
        try:
            return answer.to_wire(max_size=limit)
        except dns.exception.TooBig:
            short = dns.message.make_response(query)
            short.flags |= dns.flags.TC | dns.flags.RA
            short.set_rcode(answer.rcode())
            return short.to_wire(max_size=limit)

    @staticmethod
    def udp_limit(query: dns.message.Message) -> int:
        if query.edns >= 0:
            return max(UDP_DEFAULT, min(query.payload, UDP_MAX))
        return UDP_DEFAULT


def fit(query_wire: bytes, answer_wire: bytes, limit: int | None) -> bytes:
    """An upstream's answer within the client's UDP size (truncated, TC, when
    larger): only such an answer is parsed."""
    if limit is None or len(answer_wire) <= limit:
        return answer_wire
    try:
        query = dns.message.from_wire(query_wire)
        answer = dns.message.from_wire(answer_wire, ignore_trailing=True)
    except Exception:  # an upstream's garbage: the client gets a failure, not it
        return short_answer(query_wire, SERVFAIL) or b""
    return Answers.to_wire(query, answer, limit)


def short_answer(wire: bytes, rcode: int) -> bytes | None:
    """An answer with `rcode` and no records, made of the query's header and
    question bytes alone (no parsing): what the budget refuses with, and a
    failed forward's SERVFAIL. None: no query to answer (too short, or a
    response)."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    question = _question(wire)
    # QR, the query's opcode and RD; RA and the rcode
    flags = bytes((0x80 | (wire[2] & 0x79), 0x80 | rcode))
    return wire[:2] + flags + (b"\x00\x01" if question else b"\x00\x00") + bytes(6) + question


def _question(wire: bytes) -> bytes:
    """The bytes of a query's one question (name, type, class), or b"" when it
    has another count or a name that does not end where it should."""
    if wire[4:6] != b"\x00\x01":
        return b""
    i, end = 12, len(wire)
    while i < end and i < 12 + 255:
        n = wire[i]
        if n == 0:
            return wire[12 : i + 5] if i + 5 <= end else b""
        if n & 0xC0:  # a compression pointer: no question of a query has one
            return b""
        i += n + 1
    return b""
