"""tether-fused's side of DNS: the sockets on <gateway>:53, the DNS process
that answers them (server.py, <run_dir>/dns.pid), and publishing DnsData to it.

At start, in this order:
  1. a DNS process is running: take it over (it hands its sockets over,
     SCM_RIGHTS); one of other code or other settings is replaced by a new
     one on the same sockets, started before the old one stops (both read
     the same queue meanwhile: no query is lost, none waits);
  2. none: bind the sockets (a big receive buffer) and start one.
We keep a copy of both sockets: when the process dies, queries wait in the
socket's queue until the watcher (a pidfd) has started the next one, which
gets the last DnsData before it answers anything.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
from pathlib import Path

from .. import child
from ..render import DnsData
from .server import MODULE, NAME, args_of, code_version, encode

log = logging.getLogger("tether.dns")

ACK_TIMEOUT = 1.0  # s for the DNS process to take a publish (it applies one in milliseconds), else restarted
PUBLISH_WAIT = 0.05  # s a publish waits for that on the caller's thread (the daemon's loop), at most
RCVBUF = 8 << 20  # the UDP receive queue: a restart's queries, a burst's
SO_RCVBUFFORCE = 33  # root: above net.core.rmem_max
IP_FREEBIND = 15  # bind before the bridge has its address


class DnsError(Exception):
    """DNS cannot be served as configured; the message says why and what to do."""


def bind(gateway: str) -> tuple[socket.socket, socket.socket]:
    """<gateway>:53, UDP and TCP, or a one-line DnsError."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for s in (udp, tcp):
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            s.bind((gateway, 53))
        tcp.listen(128)
    except OSError as e:
        udp.close()
        tcp.close()
        hint = (": another DNS server listens there (`ss -lunp 'sport = :53'`); stop it, or set [dns] enabled = false"
                if e.errno == errno.EADDRINUSE else "")
        raise DnsError(f"cannot answer DNS on {gateway}:53: {e.strerror}{hint}") from None
    return udp, tcp


class DnsService:
    def __init__(self, run_dir: Path, gateway: str, qps: int, upstreams: list[tuple[str, int]], search: list[str],
                 timeout: float, log_level: str = "info") -> None:
        self.run_dir = Path(run_dir)
        self.gateway = gateway
        self.args = args_of(qps, upstreams, search, timeout)
        self.log_level = log_level
        self.child = child.Child(self.run_dir, NAME, MODULE)
        self.udp: socket.socket | None = None
        self.tcp: socket.socket | None = None
        self.lock = threading.RLock()
        self.latest: DnsData | None = None  # the last data published
        self._sent: DnsData | None = None  # what the DNS process has
        self._seq = 0
        # publishes are counted: the sender thread hands the latest to the DNS
        # process, and a publish waits (a moment at most) until that is done
        self._handed = threading.Condition()
        self._given = self._taken = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._sender: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid

    # --- start -------------------------------------------------------------------------
    def start(self) -> str:
        """Take over or start the DNS process; returns how."""
        with self.lock:
            how = self._take_over()
            if how is None:
                self.udp, self.tcp = bind(self.gateway)
                self._spawn()
                how = f"started DNS responder {self.pid}"
        self._watcher = threading.Thread(target=self.child.watch, args=(self._restart, self._stop),
                                         name="tether-dns-watch", daemon=True)
        self._watcher.start()
        self._sender = threading.Thread(target=self._send_loop, name="tether-dns-publish", daemon=True)
        self._sender.start()
        return how

    def _take_over(self) -> str | None:
        pid = child.running(self.run_dir, NAME, MODULE)
        if pid is None:
            return None
        old = child.Child(self.run_dir, NAME, MODULE)
        try:
            hello = old.adopt(pid)
            _, fds = old.call({"op": "handover"}, timeout=5.0, with_fds=True)
        except (OSError, ValueError) as e:
            # its sockets are all it has: new ones lose only what is in its queue
            log.warning("DNS responder %d does not hand its sockets over (%s): stopping it", pid, e)
            if old.pidfd is None:
                child.terminate(pid)
            old.forget()  # gone, and its sockets with it: ours can be bound
            return None
        socks = [socket.socket(fileno=fd) for fd in fds]
        if len(socks) != 2 or socks[0].getsockname() != (self.gateway, 53):
            log.info("DNS responder %d answers on %s, not on %s:53: stopping it",
                     pid, socks[0].getsockname() if socks else "?", self.gateway)
            for s in socks:
                s.close()
            _stop(old)
            return None
        self.udp, self.tcp = socks
        why = "other code" if hello.get("version") != code_version() else \
            "other settings" if hello.get("args") != self.args else None
        if why is None:
            self.child = old
            self._publish_locked()
            return f"took over DNS responder {pid}"
        problem = child.check_code(MODULE) if why == "other code" else None
        if problem is None:
            try:
                self._spawn()  # both answer from the same sockets until the old one stops
            except DnsError as e:
                problem = str(e)
        if problem is not None:
            log.error("this installation's DNS responder cannot start (%s): DNS responder %d (%s) keeps answering",
                      problem, pid, why)
            self.child = old
            self._publish_locked()
            return f"took over DNS responder {pid} (not replaced: see above)"
        _stop(old)
        return f"replaced DNS responder {pid} ({why}) by {self.pid} on the same sockets"

    def _spawn(self) -> None:
        """A DNS process on our sockets, given the latest data before it answers."""
        udp, tcp = self.udp.fileno(), self.tcp.fileno()
        try:
            self.child.spawn(["--udp-fd", str(udp), "--tcp-fd", str(tcp), "--log-level", self.log_level, *self.args],
                             [udp, tcp])
        except child.ChildError as e:
            raise DnsError(str(e)) from None
        with self.lock:
            self._sent = None
            self._publish_locked()

    # --- publishing --------------------------------------------------------------------
    def publish(self, data: DnsData) -> None:
        """Hand `data` to the DNS process; returns once it answers from it, or
        after PUBLISH_WAIT (a stuck DNS process never holds the daemon's
        loop: the sender goes on, and restarts it past ACK_TIMEOUT), or at
        once when there is none right now (the next one gets it first)."""
        with self._handed:
            self.latest = data
            self._given += 1
            mine = self._given
            self._handed.notify_all()
            if self._sender is not None and self.child.conn is not None:
                self._handed.wait_for(lambda: self._taken >= mine, timeout=PUBLISH_WAIT)

    def _send_loop(self) -> None:
        while True:
            with self._handed:
                self._handed.wait_for(lambda: self._given > self._taken or self._stop.is_set())
                if self._stop.is_set():
                    return
                given = self._given
            with self.lock:
                self._publish_locked()
            with self._handed:
                self._taken = max(self._taken, given)
                self._handed.notify_all()

    def _publish_locked(self) -> None:
        data = self.latest  # once: a publish may replace it meanwhile
        if data is None or self.child.conn is None:
            return
        self._seq += 1
        msg = encode(self._sent, data)
        msg["seq"] = self._seq
        try:
            self.child.call(msg, timeout=ACK_TIMEOUT)
        except (OSError, ValueError) as e:
            log.warning("DNS responder %s did not take the data (%s): restarting it", self.child.pid, e)
            self.child.kill()
            self._sent = None
            return
        self._sent = data

    # --- watching ----------------------------------------------------------------------
    def _restart(self) -> bool:
        """A new DNS process on the same sockets; False: not now (retry).
        It starts outside the lock: a publish meanwhile only keeps the latest."""
        with self.lock:
            dead = self.child.pid
            self.child.forget()
            self._sent = None  # the next one gets all of it, whoever sends first
        log.warning("DNS responder %s is gone: starting another on the same sockets", dead)
        try:
            self._spawn()
        except DnsError as e:
            log.error("cannot restart the DNS responder: %s", e)
            return False
        self.restarts += 1
        log.info("DNS responder %d answers again", self.pid)
        return True

    def close(self) -> None:
        """Stop watching; the DNS process keeps answering (a restart takes over)."""
        self._stop.set()
        with self._handed:
            self._handed.notify_all()
        for t in (self._watcher, self._sender):
            if t is not None:
                t.join(timeout=2)
        with self.lock:
            self.child.release()
            for s in (self.udp, self.tcp):
                if s is not None:
                    s.close()
            self.udp = self.tcp = None


def _stop(old: child.Child) -> None:
    """Stop a DNS process we no longer want (replaced, or on other sockets)."""
    try:
        old.call({"op": "stop"}, timeout=2.0)
    except (OSError, ValueError):
        pass
    old.forget()


def stop_all(run_dir: Path) -> list[str]:
    """--cleanup, or DNS turned off: stop the DNS process. Returns what it did."""
    done = []
    pid = child.running(Path(run_dir), NAME, MODULE)
    if pid is not None:
        child.terminate(pid)
        done.append(f"stopped DNS responder {pid}")
    for name in (f"{NAME}.sock", f"{NAME}.pid"):
        try:
            (Path(run_dir) / name).unlink()
        except FileNotFoundError:
            pass
    return done
