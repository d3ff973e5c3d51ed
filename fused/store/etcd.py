"""etcd store (the Store protocol of base.py), for several hosts sharing one
address space ([store] backend = "etcd"; DESIGN "Multi-host").

etcd's Raft is the distributed engine; tether writes no consensus of its own.
Keys, under `[store] prefix` (P), values JSON:

    P/rev                   the store's revision, a counter: every commit
                            writes the next one
    P/last                  who wrote the last commit (a commit whose answer
                            is lost is looked up there before it is undone)
    P/c/NAME                a Container (its `host` says where it runs)
    P/ip/NAME               its IpLease
    P/port/PORT/PROTO       a PortLease
    P/link/CONSUMER/ALIAS   a Link
    P/group/GROUP           a link group's target
    P/host/HOST             {"underlay": ADDRESS}: a live host, on an etcd
                            lease with a TTL that only its tether-fused renews
    P/underlay/HOST         its underlay address, kept when it dies: its
                            containers stay reachable while they run on

`snapshot()` is one range read of P/ (every record at one etcd revision).
`commit()` is one etcd transaction conditioned on P/rev being the one the
snapshot read (compare-and-swap): a change planned on a snapshot
that another host's commit made stale fails as Conflict, and the caller plans
again on a fresh one. So two hosts never take the same address or host port.

A watch on P/ (a thread) tells `on_change` when another host committed or a
host came or went; the next snapshot() reads again. Between changes,
snapshot() is the last one read or committed, with no request. A lost watch
reconnects from the last revision it saw, or, when etcd compacted that
revision away, reads everything again.

Only tether-fused talks to etcd, never the hook; its requests time out after
`[store] timeout`, so a start with etcd unreachable fails within the hook's
budget, in one line naming the endpoint.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, fields

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors

from ..model import Container, IpLease, Link, PortLease
from ..errors import StoreFull
from .base import ChangeSet, Conflict, StoreError, StoreSnapshot, apply

log = logging.getLogger("tether.store")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b).decode()


def _tuples(cls, d: dict):
    """A dataclass from its JSON (lists back to tuples)."""
    kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


class EtcdUnreachable(StoreError):
    """`sent`: the request went out and its answer did not come (etcd may
    still apply it when it runs again), rather than no connection at all."""

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class EtcdStore:
    """`host`, `underlay`: this host's liveness record; `ttl` its lease."""

    def __init__(self, endpoints: list[str], prefix: str, host: str, underlay: str = "", ttl: int = 10,
                 timeout: float = 2.0, on_change: Callable[[], None] | None = None) -> None:
        self.endpoints = endpoints
        self.prefix = prefix.rstrip("/")
        self.host, self.underlay, self.ttl, self.timeout = host, underlay, ttl, timeout
        self.on_change = on_change
        # one set of connections per thread (a requests.Session is not
        # thread safe): requests, keepalives, the watch
        self._clients = [self._client(e) for e in endpoints]
        self._ka_clients = [self._client(e) for e in endpoints]
        self._watch_clients = [self._client(e) for e in endpoints]
        self._down_until = 0.0  # etcd found unreachable: requests fail at once until then
        self._down = ""
        self._mutex = threading.Lock()
        self._snap: StoreSnapshot | None = None
        self._read_rev = 0  # the etcd revision the cached snapshot is at
        self._dirty = True
        self.hosts: dict[str, dict] = {}  # live hosts -> their record
        self.underlays: dict[str, str] = {}  # every host that ever joined -> its underlay address
        self._lease: int | None = None
        self._stop = threading.Event()
        self._post("/maintenance/status", {})  # unreachable: one line, before anything is joined
        self._join()

    @property
    def where(self) -> str:
        """The store, as a line that says what a request waited for names it."""
        return f"etcd at {', '.join(self.endpoints)}"

    def _client(self, endpoint: str) -> etcd3gw.Etcd3Client:
        proto, _, rest = endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        # connecting takes a LAN's round trip: an endpoint that does not
        # answer is given up on well before the request timeout
        timeout = (min(0.5, self.timeout), self.timeout)
        return etcd3gw.Etcd3Client(host=host.strip("[]"), port=int(port), protocol=proto, timeout=timeout,
                                   api_path="/v3/")

    # --- requests ---------------------------------------------------------------
    def _post(self, path: str, body: dict, clients: list | None = None) -> dict:
        """One request, to the first endpoint that answers. Unreachable: a
        one-line error, and the same at once until a request of the
        keepalive or the watch threads (which keep trying) is answered: a
        hook's request must not wait out the timeout each time, nor stall
        the daemon's other work."""
        if clients is None and time.monotonic() < self._down_until:
            raise EtcdUnreachable(self._down)
        last, sent = None, False
        for c in clients or self._clients:
            try:
                out = c.post(c.get_url(path), json=body)
                self._down_until = 0.0
                return out
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError) as e:
                last = e
                # connected, asked, no answer (a stopped etcd): requests' own words, in etcd3gw's detail
                sent = sent or "Read timed out" in (getattr(e, "detail_text", None) or str(e))
            except etcd_errors.Etcd3Exception as e:
                detail = getattr(e, "detail_text", None) or ""
                if "database space exceeded" in detail:  # its NOSPACE alarm: every write refused until disarmed
                    raise StoreFull(
                        f"etcd at {c.base_url} has no space left (mvcc: database space exceeded, its "
                        "--quota-backend-bytes): compact and defragment it, then `etcdctl alarm disarm`"
                    ) from None
                raise StoreError(f"etcd at {c.base_url} refused {path}: {(detail or str(e))[:200]}") from None
        self._dirty = True
        self._down = (
            f"etcd is unreachable at {', '.join(self.endpoints)} ({type(last).__name__}, {self.timeout:g} s): "
            "start it or fix [store] endpoints; running containers keep working"
        )
        if clients is None:  # until the keepalive (every ttl / 3) or the watch is through again
            self._down_until = float("inf")
        raise EtcdUnreachable(self._down, sent)

    def _key(self, *parts: object) -> str:
        return "/".join((self.prefix, *(str(p) for p in parts)))

    # --- this host's liveness --------------------------------------------------------
    def _join(self) -> None:
        self._grant()
        for target in (self._keepalive, self._watch):
            t = threading.Thread(target=target, name=f"etcd-{target.__name__.strip('_')}", daemon=True)
            t.start()

    def _grant(self, clients: list | None = None) -> None:
        """This host's liveness record on a new lease; refused while another
        live host has this name (a restart of this very host, at the same
        underlay address, takes its record over)."""
        key = _b64(self._key("host", self.host))
        got = self._post("/kv/range", {"key": key}, clients).get("kvs", [])
        if got:
            other = json.loads(_unb64(got[0].get("value", "")) or "{}").get("underlay")
            if other != self.underlay:
                raise StoreError(
                    f"host name {self.host!r} is taken in this cluster by a live host at {other}: "
                    "give this one another [cluster] host"
                )
        lease = self._post("/lease/grant", {"TTL": self.ttl}, clients)
        self._lease = int(lease["ID"])
        value = json.dumps({"underlay": self.underlay, "since": time.time()})
        self._post("/kv/put", {"key": key, "value": _b64(value), "lease": self._lease}, clients)
        self._post("/kv/put", {"key": _b64(self._key("underlay", self.host)), "value": _b64(json.dumps(self.underlay))},
                   clients)
        log.info("etcd: host %s joined (lease %x, ttl %d s)", self.host, self._lease, self.ttl)

    def _keepalive(self) -> None:
        while not self._stop.wait(max(self.ttl / 3, 0.2)):
            try:
                out = self._post("/lease/keepalive", {"ID": self._lease}, self._ka_clients)
                if int(out.get("result", {}).get("TTL", -1)) <= 0:
                    log.warning("etcd: this host's lease expired (etcd was away longer than %d s): joining again", self.ttl)
                    self._grant(self._ka_clients)
            except StoreError as e:
                log.warning("etcd: keepalive failed: %s", e)

    # --- watching ---------------------------------------------------------------
    def _watch(self) -> None:
        start = None
        while not self._stop.is_set():
            for c in self._watch_clients:
                try:
                    if start is None:  # from the revision now, and whatever came before it read again
                        out = self._post("/kv/range", {"key": _b64(self._key("rev"))}, [c])
                        start = int(out["header"]["revision"]) + 1
                        self._changed()
                    start = self._stream(c, start)
                except (requests.RequestException, OSError, ValueError, KeyError, StoreError) as e:
                    if self._stop.is_set():
                        return
                    log.debug("etcd: watch on %s lost: %s", c.base_url, e)
            self._stop.wait(0.5)

    def _stream(self, c: etcd3gw.Etcd3Client, start: int) -> int | None:
        """Follow the prefix from revision `start` until the stream ends;
        returns the revision to go on from (None: compacted away)."""
        req = {"key": _b64(self.prefix + "/"), "range_end": _b64(_range_end(self.prefix + "/")),
               "progress_notify": True, "start_revision": start}
        with c.session.post(c.get_url("/watch"), json={"create_request": req}, stream=True,
                            timeout=(self.timeout, 60)) as resp:
            resp.raise_for_status()
            if self._down_until:  # through again: requests may try etcd
                self._down_until = 0.0
                log.info("etcd: reachable again at %s", c.base_url)
            for line in resp.iter_lines():
                if self._stop.is_set():
                    return start
                if not line.strip():
                    continue
                result = json.loads(line)["result"]
                if int(result.get("compact_revision", 0) or 0):
                    log.warning("etcd: revision %s was compacted away: reading everything again", start)
                    self._changed()
                    return None
                if result.get("created"):
                    # its header is etcd's revision now, ahead of the events
                    # still to be replayed from `start`: not where to go on from
                    continue
                rev = int(result.get("header", {}).get("revision", 0))
                events = result.get("events", [])
                if events:
                    newest = max(int(e["kv"].get("mod_revision", 0)) for e in events)
                    if newest > self._read_rev:
                        self._changed()
                if rev:
                    start = rev + 1
        return start

    def _changed(self) -> None:
        self._dirty = True
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - the watcher must outlive a daemon shutting down
                log.debug("on_change failed", exc_info=True)

    # --- reading ------------------------------------------------------------------
    def snapshot(self) -> StoreSnapshot:
        with self._mutex:
            if self._snap is not None and not self._dirty:
                return self._snap
            self._dirty = False  # an event from here on marks it again
            try:
                snap, rev = self._read()
            except BaseException:
                self._dirty = True
                raise
            self._snap, self._read_rev = snap, max(rev, self._read_rev)
            return snap

    def _read(self) -> tuple[StoreSnapshot, int]:
        p = self.prefix + "/"
        out = self._post("/kv/range", {"key": _b64(p), "range_end": _b64(_range_end(p))})
        rev = int(out["header"]["revision"])
        containers, ips, ports, links, groups, hosts, underlays = {}, {}, {}, {}, {}, {}, {}
        store_rev = 0
        for kv in out.get("kvs", []):
            key = _unb64(kv["key"])[len(p):]
            value = json.loads(_unb64(kv.get("value", "")) or "null")
            kind, _, rest = key.partition("/")
            try:
                if kind == "rev":
                    store_rev = int(value)
                elif kind == "c":
                    containers[rest] = _tuples(Container, value)
                elif kind == "ip":
                    ips[rest] = _tuples(IpLease, value)
                elif kind == "port":
                    lease = _tuples(PortLease, value)
                    ports[lease.key] = lease
                elif kind == "link":
                    link = Link(*value)
                    links[(link.consumer, link.alias)] = link
                elif kind == "group":
                    groups[rest] = value
                elif kind == "host":
                    hosts[rest] = value
                elif kind == "underlay":
                    underlays[rest] = value
            except (TypeError, ValueError) as e:
                raise StoreError(f"etcd key {p}{key[:80]} is not a tether record ({e}): fix or delete it") from None
        self.hosts, self.underlays = hosts, underlays
        return StoreSnapshot(store_rev, containers, ips, ports, links, groups), rev

    def live_hosts(self) -> dict[str, dict]:
        return self.hosts

    # --- writing ------------------------------------------------------------------
    def _ops(self, ch: ChangeSet) -> list[dict]:
        ops = []

        def put(key: str, value) -> None:
            ops.append({"request_put": {"key": _b64(key), "value": _b64(json.dumps(value))}})

        def delete(key: str) -> None:
            ops.append({"request_delete_range": {"key": _b64(key)}})

        for name, c in ch.containers.items():
            put(self._key("c", name), asdict(c)) if c is not None else delete(self._key("c", name))
        for name, l in ch.ip_leases.items():
            put(self._key("ip", name), asdict(l)) if l is not None else delete(self._key("ip", name))
        for (hp, proto), l in ch.port_leases.items():
            put(self._key("port", hp, proto), asdict(l)) if l is not None else delete(self._key("port", hp, proto))
        for (consumer, alias), l in ch.links.items():
            k = self._key("link", consumer, alias)
            put(k, list(l)) if l is not None else delete(k)
        for g, t in ch.groups.items():
            put(self._key("group", g), t) if t is not None else delete(self._key("group", g))
        return ops

    def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        _check(change)
        with self._mutex:
            before = self._snap
            ops = self._ops(change)
            ops.append({"request_put": {"key": _b64(self._key("rev")), "value": _b64(str(revision + 1))}})
            nonce = f"{self.host} {time.time_ns()}"  # whose commit this is, if its answer is lost
            ops.append({"request_put": {"key": _b64(self._key("last")), "value": _b64(json.dumps(nonce))}})
            if len(ops) > MAX_TXN_OPS:
                raise StoreError(
                    f"this change writes {len(ops)} etcd keys in one transaction, more than etcd's default "
                    f"{MAX_TXN_OPS}: start etcd with --max-txn-ops 4096 (or make the change in smaller steps)"
                )
            rev_key = _b64(self._key("rev"))
            txn = {
                "compare": [{"key": rev_key, "target": "VALUE", "result": "EQUAL", "value": _b64(str(revision))}]
                if revision else [{"key": rev_key, "target": "VERSION", "result": "EQUAL", "version": "0"}],
                "success": ops,
            }
            try:
                out = self._post("/kv/txn", txn)
            except EtcdUnreachable as e:
                if not self._landed(nonce):
                    if e.sent:  # neither answered nor known to be lost: say so, not "nothing changed"
                        raise EtcdUnreachable(
                            f"etcd at {', '.join(self.endpoints)} did not answer the commit within {self.timeout:g} s: "
                            "if it applies it once it runs again, tether follows the store (see `tether ps`, `tether link ls`); running "
                            "containers keep working", sent=True) from None
                    raise
                out = {"succeeded": True, "header": {"revision": "0"}}  # it did: go on as if answered
            if not out.get("succeeded"):
                self._dirty = True
                raise Conflict(f"the store changed since revision {revision} (another host committed): plan again")
            rev = int(out["header"]["revision"])
            if rev == self._read_rev + 1:  # nothing (a host's coming or going) between the last read and it
                self._read_rev = rev
            else:
                self._dirty = True
            if before is not None and before.revision == revision:
                # no commit came between the snapshot planned on and this
                # one (the compare says so): the snapshot after it, unread
                self._snap = apply(before, change, revision + 1)
                return self._snap
            self._dirty = True
        return self.snapshot()

    def _landed(self, nonce: str) -> bool:
        """A transaction whose answer never came: was it applied? (Its
        kernel steps must not be undone if it was.) Asked once, on the
        keepalive's connections; unknown counts as not."""
        clients = [self._client(e) for e in self.endpoints]  # the keepalive thread's are in use
        try:
            out = self._post("/kv/range", {"key": _b64(self._key("last"))}, clients)
        except StoreError:
            return False
        finally:
            for c in clients:
                c.session.close()
        kvs = out.get("kvs", [])
        return bool(kvs) and json.loads(_unb64(kvs[0].get("value", "")) or "null") == nonce

    def close(self) -> None:
        """Stop the threads. The host record stays until its lease expires:
        a restart within `ttl` (an upgrade) takes it over, and the other hosts
        never see this host gone."""
        self._stop.set()
        for c in (*self._clients, *self._ka_clients, *self._watch_clients):
            c.session.close()


def _check(change: ChangeSet) -> None:
    """What SQLite's schema enforces and etcd does not: every link's group
    is written or kept (the caller's Draft makes it so)."""
    for l in change.links.values():
        if l is not None and not l.group:
            raise StoreError(f"link {l.consumer}:{l.alias} has no group")
