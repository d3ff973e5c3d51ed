"""The DNS responder: A, SRV and PTR per asking container, on the bridge gateway.

It answers from the published `DnsData` (replaced whole on every change: the
next query sees it, no reload) and identifies the asking container by its
source address; a query from any other source is REFUSED. Names tether does
not know are forwarded to the upstreams (SERVFAIL when they do not answer in
time, NXDOMAIN when there are none). Wire format: dnspython. Listens on
<gateway>:53, UDP and TCP, and nowhere else.
"""
from __future__ import annotations

import logging
import socket

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
import trio

from .render import DnsData

log = logging.getLogger("tether.dns")

TTL = 0  # every answer can change with the link graph
UDP_DEFAULT = 512
UDP_MAX = 4096
MAX_FORWARDS = 256  # queries forwarded at once
TCP_IDLE = 10.0


class Responder:
    def __init__(self, gateway: str, upstreams: list[tuple[str, int]], search: list[str], timeout: float = 2.0) -> None:
        self.gateway = gateway
        self.upstreams = upstreams
        self.suffixes = [dns.name.from_text(s) for s in search]
        self.timeout = timeout
        self.data = DnsData({}, {}, {})
        self.forwards = trio.CapacityLimiter(MAX_FORWARDS)
        self.counters = {"answered": 0, "forwarded": 0, "refused": 0, "dropped": 0}

    def publish(self, data: DnsData) -> None:
        self.data = data

    # --- answering (pure over self.data) -------------------------------------
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
            return self._unknown(resp) if not self.upstreams else None
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
        if answer is None and not self.upstreams:
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

    # --- forwarding --------------------------------------------------------------
    async def forward(self, query: dns.message.Message, tcp: bool) -> bytes:
        """The first upstream answer (raw, with the query's id), or SERVFAIL."""
        wire = query.to_wire()
        async with self.forwards:
            for host, port in self.upstreams:
                with trio.move_on_after(self.timeout):
                    try:
                        raw = await (_ask_tcp(wire, host, port) if tcp else _ask_udp(wire, host, port))
                    except OSError:
                        continue
                    if raw is not None and len(raw) >= 12 and raw[:2] == wire[:2]:
                        self.counters["forwarded"] += 1
                        return raw
        fail = dns.message.make_response(query)
        fail.flags |= dns.flags.RA
        fail.set_rcode(dns.rcode.SERVFAIL)
        return fail.to_wire()

    # --- serving -----------------------------------------------------------------
    async def serve_udp(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((self.gateway, 53))
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    wire, (src, sport) = await sock.recvfrom(65535)
                except OSError:
                    continue
                query, answer = self.handle(wire, src)
                if query is None:
                    continue
                limit = self.udp_limit(query)
                if answer is not None:
                    self.counters["answered"] += 1
                    await _sendto(sock, self.to_wire(query, answer, limit), (src, sport))
                else:
                    nursery.start_soon(self._forward_udp, sock, query, (src, sport), limit)

    async def _forward_udp(self, sock, query, addr, limit) -> None:
        raw = await self.forward(query, tcp=False)
        if len(raw) > limit:  # an upstream answer larger than the client allows
            raw = self.to_wire(query, dns.message.from_wire(raw, ignore_trailing=True), limit)
        await _sendto(sock, raw, addr)

    async def serve_tcp(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(53, host=self.gateway)
        task_status.started()
        await trio.serve_listeners(self._tcp_conn, listeners)

    async def _tcp_conn(self, stream: trio.SocketStream) -> None:
        src = stream.socket.getpeername()[0]
        buf = b""
        async with stream:
            while True:
                with trio.move_on_after(TCP_IDLE) as idle:
                    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                        chunk = await stream.receive_some(65535)
                        if not chunk:
                            return
                        buf += chunk
                if idle.cancelled_caught:
                    return
                n = int.from_bytes(buf[:2], "big")
                wire, buf = buf[2 : 2 + n], buf[2 + n :]
                query, answer = self.handle(wire, src)
                if query is None:
                    return  # malformed: close
                if answer is not None:
                    self.counters["answered"] += 1
                    out = self.to_wire(query, answer, 65535)
                else:
                    out = await self.forward(query, tcp=True)
                try:
                    await stream.send_all(len(out).to_bytes(2, "big") + out)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def _sendto(sock, data: bytes, addr) -> None:
    try:
        await sock.sendto(data, addr)
    except OSError:
        pass


async def _ask_udp(wire: bytes, host: str, port: int) -> bytes | None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.connect((host, port))
        await s.send(wire)
        while True:
            raw = await s.recv(65535)
            if raw[:2] == wire[:2]:
                return raw


async def _ask_tcp(wire: bytes, host: str, port: int) -> bytes | None:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(len(wire).to_bytes(2, "big") + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = await stream.receive_some(65535)
            if not chunk:
                return None
            buf += chunk
        return buf[2 : 2 + int.from_bytes(buf[:2], "big")]
