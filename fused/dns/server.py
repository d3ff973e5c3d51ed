"""The DNS responder: a process of its own (<run_dir>/dns.pid) that answers on
the bridge gateway's port 53 and outlives tether-fused.

    python -m fused.dns.server --run-dir DIR --udp-fd N --tcp-fd M --qps Q
                               [--upstream IP:PORT]... [--search DOMAIN]... [--timeout S]

tether-fused binds the two sockets (<gateway>:53, UDP and TCP) and keeps a
copy of each, so that queries that arrive while this process is being
replaced or started again wait in the socket's queue instead of being lost;
the process answers from the last DnsData tether-fused published to it, also
while tether-fused is down. It answers nothing before its first publish.

Each UDP datagram meets the source's budget first (budget.py: a dictionary
lookup, no parsing); past it, REFUSED made from the header bytes, then
nothing. The queries let in are answered by answer.py; the rest go to the
upstreams (forward.py) from a thread of their own. TCP: a thread per
connection, at most MAX_TCP at once.

Channel (<run_dir>/dns.sock, root only; fused.channel's frames):
    {"op": "hello"}    -> {"pid", "version", "args", "serving", "seq", "counters"}
    {"op": "publish", "seq", "full", "names", "names_gone", "links", "hosts", "gone"}
                       -> {"seq"}   (applied whole, then acked; see encode())
    {"op": "handover"} -> {} + the UDP and TCP sockets (SCM_RIGHTS)
    {"op": "stop"}     -> {} and the process exits
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import socket
import struct
import threading
import time

from .. import child
from ..channel import Response, listen, serve
from ..graph import Resolved
from ..model import PortSpec
from ..render import DnsData
from . import budget as budget_mod
from .answer import REFUSED, SERVFAIL, Answers, Forward, short_answer
from .forward import Forwarder, Reply, Send

log = logging.getLogger("tether.dns")

NAME = "dns"
MODULE = "fused.dns.server"
MAX_TCP = 64  # connections at once; past it, a new one is closed at once
TCP_IDLE = 10.0
MAX_UDP = 4096  # a longer datagram is no query
TICK = 1.0  # s between two budget log lines
# the modules this process runs, for its code version (the test of this list
# fails when the process loads one it does not name)
CODE = ("channel.py", "child.py", "errors.py", "model.py", "graph.py", "render.py",
        "dns/__init__.py", "dns/answer.py", "dns/budget.py", "dns/forward.py", "dns/server.py")


def code_version() -> str:
    """A digest of this process's code and its dnspython: tether-fused
    replaces a DNS process that differs (an upgrade)."""
    import hashlib

    import dns.version

    h = hashlib.blake2b(digest_size=8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in CODE:
        with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
    h.update(dns.version.version.encode())
    return h.hexdigest()


# --- the published data on the channel -----------------------------------------
def _link_wire(r: Resolved) -> tuple:
    return (r.alias, r.target, r.address, tuple(tuple(p) for p in r.ports), r.state)


def encode(sent: DnsData | None, data: DnsData) -> dict:
    """A publish message: all of `data`, or (with `sent`, what the process
    has) what changed. DnsData shares each untouched address's entries with
    the one before it, so the change is found by identity."""
    if sent is None:
        return {"op": "publish", "full": True, "names": data.names,
                "links": {ip: {a: _link_wire(r) for a, r in by.items()} for ip, by in data.links.items()},
                "hosts": data.hosts, "names_gone": [], "gone": []}
    links = {ip: {a: _link_wire(r) for a, r in by.items()} for ip, by in data.links.items()
             if sent.links.get(ip) is not by}
    hosts = {ip: names for ip, names in data.hosts.items() if sent.hosts.get(ip) is not names}
    return {"op": "publish", "full": False,
            "names": {n: ip for n, ip in data.names.items() if sent.names.get(n) != ip},
            "names_gone": [n for n in sent.names if n not in data.names],
            "links": links, "hosts": hosts,
            "gone": [ip for ip in sent.links if ip not in data.links] + [ip for ip in sent.hosts if ip not in data.hosts]}


def decode(old: DnsData, msg: dict) -> DnsData:
    """The DnsData a publish message makes of `old`."""
    base = DnsData({}, {}, None, {}) if msg.get("full") else old
    names, links, hosts = dict(base.names), dict(base.links), dict(base.hosts)
    for n in msg.get("names_gone", ()):
        names.pop(n, None)
    for ip in msg.get("gone", ()):
        links.pop(ip, None)
        hosts.pop(ip, None)
    names.update(msg.get("names", {}))
    hosts.update(msg.get("hosts", {}))
    for ip, by in msg.get("links", {}).items():
        links[ip] = {a: Resolved(al, t, addr, tuple(PortSpec(*p) for p in ports), st)
                     for a, (al, t, addr, ports, st) in by.items()}
    return DnsData(names, links, None, hosts)


class Responder:
    def __init__(self, run_dir: str, udp: socket.socket, tcp: socket.socket, qps: int,
                 upstreams: list[tuple[str, int]], search: list[str], timeout: float, args: list[str]) -> None:
        self.run_dir = run_dir
        self.udp, self.tcp = udp, tcp
        self.qps = qps
        self.answers = Answers(search, forwarding=bool(upstreams))
        self.budget = budget_mod.Budget(qps)
        self.forwarder = Forwarder(upstreams, timeout)
        self.forward_lock = threading.Lock()
        # a connected socket per upstream: the kernel takes answers from it
        # alone, and nothing of ours listens anywhere but the gateway
        self.upstreams = {}
        for u in upstreams:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.connect(u)
            self.upstreams[u] = s
        self.tcp_timeout = timeout
        self.tcp_slots = threading.BoundedSemaphore(MAX_TCP)
        self.args = args  # what it was started with: tether-fused replaces one started otherwise
        self.ready = threading.Event()  # set by the first publish
        self.seq = 0
        self.version = code_version()
        self.refused_total = self.dropped_total = 0

    # --- the channel -----------------------------------------------------------------
    def client(self, conn: socket.socket) -> None:
        serve(conn, {"publish": self._publish, "hello": self._hello, "handover": self._handover, "stop": self._stop},
              "DNS channel")

    def _publish(self, msg: dict, _fds) -> Response:
        self.answers.publish(decode(self.answers.data, msg))
        self.seq = msg.get("seq", self.seq)
        self.ready.set()
        return Response({"seq": self.seq})

    def _hello(self, _msg, _fds) -> Response:
        return Response({"pid": os.getpid(), "version": self.version, "args": self.args, "serving": self.ready.is_set(),
                      "seq": self.seq, "counters": {**self.answers.counters, "over_refused": self.refused_total,
                                                    "over_dropped": self.dropped_total}})

    def _handover(self, _msg, _fds) -> Response:
        return Response({}, [self.udp.fileno(), self.tcp.fileno()])

    def _stop(self, _msg, _fds) -> Response:
        log.info("DNS responder %d: stopping on request", os.getpid())
        return Response({}, exit=True)

    def accept_loop(self, listener: socket.socket, serve) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    # --- UDP -------------------------------------------------------------------------
    def serve_udp(self) -> None:
        """The hot loop: one recvfrom, one budget lookup, then an answer, a
        REFUSED of the header's bytes, or nothing."""
        sock, answers, spend = self.udp, self.answers, self.budget.spend
        recvfrom, sendto, clock = sock.recvfrom, sock.sendto, time.monotonic
        # wake up once a second with no traffic, for the budget's log line
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(TICK), 0))
        next_tick = clock() + TICK
        while True:
            try:
                wire, client_addr = recvfrom(MAX_UDP)
            except BlockingIOError:  # SO_RCVTIMEO: nothing for a second
                wire = None
            except OSError as e:
                if e.errno == errno.EBADF:  # closed: only a test closes it
                    return
                continue
            now = clock()
            if now >= next_tick:
                self.tick(now - next_tick + TICK)
                next_tick = now + TICK
            if wire is None:
                continue
            verdict = spend(client_addr[0], now)
            if verdict:
                if verdict == budget_mod.REFUSE:
                    out = short_answer(wire, REFUSED)
                    if out is not None:
                        try:
                            sendto(out, client_addr)
                        except OSError:
                            pass
                continue
            out = answers.respond(wire, client_addr[0])
            if out is None:
                continue
            if isinstance(out, Forward):
                with self.forward_lock:
                    out = self.forwarder.start(out.wire, client_addr, out.limit, now)
                self._do(out)
                continue
            try:
                sendto(out, client_addr)
            except OSError:
                pass

    def tick(self, seconds: float) -> None:
        over = self.budget.tick(time.monotonic())
        if over:
            self.refused_total += sum(o.refused for o in over)
            self.dropped_total += sum(o.dropped for o in over)
            log.warning("%s", budget_mod.report(over, self.qps, seconds))

    def _do(self, what: Send | Reply) -> None:
        try:
            if isinstance(what, Send):
                self.upstreams[what.to].send(what.wire)
            elif what.wire:
                self.udp.sendto(what.wire, what.client)
        except OSError:
            pass

    def serve_upstreams(self) -> None:
        """The upstreams' answers, and the queries they did not answer in time."""
        by_fd = {sock.fileno(): (u, sock) for u, sock in self.upstreams.items()}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while True:
            with self.forward_lock:
                deadline = self.forwarder.next_deadline()
            wait = 0.5 if deadline is None else max(0.001, min(0.5, deadline - time.monotonic()))
            got = []
            for fd, _ in poller.poll(wait * 1000):
                upstream, sock = by_fd[fd]
                try:
                    got.append((sock.recv(65535), upstream))
                except OSError:  # ECONNREFUSED: nothing listens there; it times out
                    pass
            with self.forward_lock:
                todo = self.forwarder.expire(time.monotonic())
                for wire, upstream in got:
                    reply = self.forwarder.answer(wire, upstream)
                    if reply is not None:
                        todo.append(reply)
            for what in todo:
                self._do(what)

    # --- TCP -------------------------------------------------------------------------
    def serve_tcp(self) -> None:
        self.ready.wait()
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                continue
            if not self.tcp_slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        try:
            with conn:
                src = conn.getpeername()[0]
                conn.settimeout(TCP_IDLE)
                while True:
                    wire = _read_tcp_message(conn)
                    if wire is None:
                        return
                    verdict = self.budget.spend(src, time.monotonic())
                    if verdict == budget_mod.DROP:
                        return
                    out = short_answer(wire, REFUSED) if verdict == budget_mod.REFUSE else self.answers.respond(wire, src, tcp=True)
                    if out is None:
                        return  # malformed: close
                    if isinstance(out, Forward):
                        out = self._forward_tcp(out.wire)
                    conn.sendall(len(out).to_bytes(2, "big") + out)
        except OSError:
            pass
        finally:
            self.tcp_slots.release()

    def _forward_tcp(self, wire: bytes) -> bytes:
        """The first upstream's answer over TCP, or SERVFAIL."""
        for host, port in self.forwarder.upstreams:
            try:
                with socket.create_connection((host, port), timeout=self.tcp_timeout) as s:
                    s.sendall(len(wire).to_bytes(2, "big") + wire)
                    raw = _read_tcp_message(s)
                if raw is not None and len(raw) >= 12 and raw[:2] == wire[:2]:
                    return raw
            except OSError:
                continue
        return short_answer(wire, SERVFAIL) or b""


def _read_tcp_message(conn: socket.socket) -> bytes | None:
    """One length-prefixed DNS message; None at EOF or a short read."""
    head = _read_exactly(conn, 2)
    if head is None:
        return None
    return _read_exactly(conn, int.from_bytes(head, "big"))


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether-dns", description="tether's DNS responder (started by tether-fused)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--udp-fd", type=int, required=True)
    p.add_argument("--tcp-fd", type=int, required=True)
    p.add_argument("--qps", type=int, required=True, help="each source address's budget ([dns] per_client_qps)")
    p.add_argument("--upstream", action="append", default=[], metavar="IP:PORT")
    p.add_argument("--search", action="append", default=[], metavar="DOMAIN")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--check", action="store_true", help="import everything, print the code version, exit 0")
    a = child.begin(p, code_version, argv)
    udp = socket.socket(fileno=a.udp_fd)
    tcp = socket.socket(fileno=a.tcp_fd)
    for s in (udp, tcp):
        s.setblocking(True)
        os.set_inheritable(s.fileno(), False)
    upstreams = [(u.rpartition(":")[0], int(u.rpartition(":")[2])) for u in a.upstream]
    srv = Responder(a.run_dir, udp, tcp, a.qps, upstreams, a.search, a.timeout, args_of(a.qps, upstreams, a.search, a.timeout))
    listener = listen(os.path.join(a.run_dir, f"{NAME}.sock"))
    child.announce(a.run_dir, NAME)
    threading.Thread(target=srv.accept_loop, args=(listener, srv.client), daemon=True, name="channel").start()
    if upstreams:
        threading.Thread(target=srv.serve_upstreams, daemon=True, name="upstreams").start()
    threading.Thread(target=srv.serve_tcp, daemon=True, name="tcp").start()
    log.info("DNS responder %d: on %s:%d, %d queries/s per source", os.getpid(), *udp.getsockname(), a.qps)
    srv.ready.wait()
    try:
        srv.serve_udp()
    except Exception:
        log.exception("DNS responder %d: the UDP loop failed; tether-fused starts another", os.getpid())
        os._exit(1)


def args_of(qps: int, upstreams: list[tuple[str, int]], search: list[str], timeout: float) -> list[str]:
    """The settings part of the command line, as tether-fused passes it and
    the process reports it (tether-fused replaces one started with others)."""
    out = ["--qps", str(qps), "--timeout", repr(float(timeout))]
    for host, port in upstreams:
        out += ["--upstream", f"{host}:{port}"]
    for d in search:
        out += ["--search", d]
    return out


if __name__ == "__main__":
    main()
