"""The one place where a request becomes: snapshot -> plan -> kernel -> commit -> publish.

Every change holds `self.lock`: one writer. It reads one store snapshot,
plans the change on a Draft of it (plan.py: pure), applies what the kernel
must have before the change is true (a veth, the firewall rules of the state
after it), commits the change set conditioned on the snapshot's revision,
and publishes the served files and DNS answers of the new snapshot. A
failure before the commit undoes the kernel steps, so a failed registration
leaves nothing behind. Kernel steps after the commit (cutting connections,
removing a veth) that fail are logged and returned as `warnings` on a
request that succeeded: the change is in the store, and saying "internal
error" would be false.

Nothing here blocks the trio thread: store calls run on the store's thread
(store/thread.py), kernel calls on the kernel's (Worker), and the served
files are handed to the file server on the publisher's (publisher.py), in
commit order; a change waits for its own files after it lets go of the lock.
A change must reach its commit within CHANGE_DEADLINE of its arrival, else
it is refused in one line naming what it waited for, with its kernel steps
undone. Read-only requests never queue behind a change: they answer from
the store when it answers within READ_WAIT, else from the last published
snapshot.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
import random
import time

import trio

from . import drift, graph, model, oci, plan, render, rules
from . import config as config_mod
from .config import Config
from .errors import DeadlineError, InputError, ServiceError, StoreError, StoreFull
from .graph import Edge, Topology, resolve_edge
from .net import ports as host_ports
from .net.firewall import Firewall
from .net.wiring import Endpoint, Wiring, Worker, netns_inode, veth_name
from .publisher import Publisher
from .store.base import ChangeSet, Conflict, Draft, Store, StoreSnapshot, inverse
from .store.thread import StoreThread

log = logging.getLogger("tether.service")

__all__ = ["Service", "ServiceError", "hook_input"]

MAX_STATE = 1 << 20
FIREWALL_INTERVAL = 1.0  # s: tether's rules, flushed by someone else, are back within two
LIVENESS_INTERVAL = 2.0  # s: a container whose process died without a poststop is stopped within two
ZERO_MAC = "00:00:00:00:00:00"
CONFLICT_ATTEMPTS = 20  # a request planned again at most this often when other hosts commit first
# The hook gives up on the daemon after 10 s: a change is refused if it has not
# reached its commit by CHANGE_DEADLINE (the commit itself takes at most the
# store's timeout), and answers by ANSWER_WITHIN, with a warning if the file
# server has not acknowledged its files by then.
CHANGE_DEADLINE = 6.0  # s
ANSWER_WITHIN = 9.0  # s
READ_WAIT = 0.25  # s: a read-only request waits this long for the store, then answers from the last publish
CHANGES = frozenset({"register", "abort", "poststop", "rm", "link_add", "link_rm", "link_retarget", "move"})


def rfc3339(ts: float | None) -> str | None:
    """A stored time (epoch seconds) as the control API gives it."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _host_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def hook_input(args: dict) -> tuple[dict, dict | None, dict]:
    """The OCI state a hook sent (unparsed, as `state_json`), its annotations
    (the state's own, else those of `bundle/config.json`) and the bundle's
    config.json ({} when it cannot be read)."""
    import json

    raw = args.get("state_json")
    if not isinstance(raw, str) or len(raw) > MAX_STATE:
        raise InputError("no OCI state received: run tether-hook from an OCI runtime, state JSON on stdin")
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"OCI state on stdin is not valid JSON ({e}): run tether-hook from an OCI runtime") from None
    if not isinstance(state, dict):
        raise InputError("OCI state on stdin must be a JSON object: run tether-hook from an OCI runtime")
    ann = state.get("annotations")
    spec = oci.read_spec(state.get("bundle"))
    if not ann and isinstance(spec.get("annotations"), dict):
        ann = spec["annotations"]
    return state, ann, spec


@dataclasses.dataclass(frozen=True)
class Published:
    """What the last publish was made of, for the next one to start from."""

    snap: StoreSnapshot
    topo: Topology
    views: dict[str, graph.View]
    files: dict[str, render.FileSet]
    dns: render.DnsData


@dataclasses.dataclass
class Request:
    """One control request, for the steps that bound and report it."""

    op: str
    started: float  # trio's clock
    deadline: float = math.inf  # its commit must begin by then
    waited: dict[str, float] = dataclasses.field(default_factory=dict)  # what it waited for, seconds
    published: int = 0  # the publisher's number of the files its commit made

    def waited_for(self, what: str, seconds: float) -> None:
        self.waited[what] = self.waited.get(what, 0.0) + seconds


_REQUEST: contextvars.ContextVar[Request | None] = contextvars.ContextVar("tether_request", default=None)


@dataclasses.dataclass(frozen=True)
class Undo:
    """A registration the hook may still abort: undone exactly while the
    store is at the revision it committed."""

    pid: int
    change: ChangeSet
    revision: int


class Service:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        wiring: Wiring,
        firewall: Firewall,
        worker: Worker,
        publish=lambda snapshot: None,
        publish_dns=lambda data: None,
        files=None,
    ) -> None:
        self.cfg = cfg
        self.files = files  # fs.session.FileService: its health
        self.publish = publish
        self.publish_dns = publish_dns
        self.store = store  # for what needs no request (live hosts, underlays); calls go through:
        self.store_thread = StoreThread(store)
        self.publisher = Publisher(self._hand_files)
        self._holder_waits = ""  # what the change holding the lock waits for now, for those behind it
        self.wiring = wiring
        self.firewall = firewall
        self.worker = worker
        self.lock = trio.Lock()
        self.rule_settings = rules.RuleSettings.of(cfg.network, cluster=cfg.clustered, dns=cfg.dns)
        self._pub: Published | None = None
        self.last_commits = 0
        # OCI id -> how to undo its registration: what an `abort` from the hook undoes
        self._undo: dict[str, Undo] = {}
        # seconds per step of the last request, for its log line
        self.steps: dict[str, float] = {}
        # with several hosts ([store] backend = "etcd"), this one's name:
        # the containers it wires, whose processes it can see
        self.host = cfg.cluster.host_name if cfg.clustered else ""
        self._seen: Topology | None = None  # the topology the last refresh saw (several hosts)

    def close(self) -> None:
        """Hand over the files still queued, then stop the store's thread (before the store is closed)."""
        self.publisher.close()
        self.store_thread.close()

    @property
    def revision(self) -> int | None:
        """The store revision of the last publish."""
        return self._pub.snap.revision if self._pub is not None else None

    # --- waiting, bounded -------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _changing(self):
        """The lock, within the request's deadline: past it, the request is
        refused, naming what the change holding the lock waits for."""
        req = _REQUEST.get()
        t0 = trio.current_time()
        with trio.move_on_at(req.deadline if req is not None else math.inf) as waiting:
            await self.lock.acquire()
        if waiting.cancelled_caught:  # (a cancelled acquire has not acquired)
            holder = self._holder_waits or "its kernel steps (veth, firewall)"
            req.waited_for(f"an earlier change, which waits for {holder}", trio.current_time() - t0)
            raise self._late(req)
        if req is not None:
            req.waited_for("an earlier change", trio.current_time() - t0)
        try:
            yield
        finally:
            self._holder_waits = ""
            self.lock.release()

    def _late(self, req: Request) -> DeadlineError:
        what = max(req.waited, key=req.waited.get) if req.waited else "its kernel steps (veth, firewall)"
        return DeadlineError(
            f"gave up after {trio.current_time() - req.started:.1f} s waiting for {what}: nothing was changed; "
            "try again"
        )

    async def _snapshot(self) -> StoreSnapshot:
        """The store's snapshot, for a change (under the lock), within its deadline."""
        req = _REQUEST.get()
        t0 = trio.current_time()
        self._holder_waits = self.store_thread.where
        snap = None
        try:
            snap = await self.store_thread.snapshot(wait=req.deadline - t0 if req is not None else math.inf)
        except trio.TooSlowError:
            pass
        finally:
            self._holder_waits = ""
            if req is not None:
                req.waited_for(self.store_thread.where, trio.current_time() - t0)
        if snap is None:
            raise self._late(req)
        return snap

    async def _view(self) -> StoreSnapshot:
        """What a read-only request answers from: the store's snapshot when
        it comes within READ_WAIT, else the last published one (the store's
        thread is held by a change that waits for the store). Never the
        lock: a reader does not queue behind a change."""
        pub = self._pub
        try:
            return await self.store_thread.snapshot(wait=READ_WAIT if pub is not None else math.inf)
        except trio.TooSlowError:
            return pub.snap

    def _hand_files(self, snapshot) -> tuple[bool, int | None]:
        """On the publisher's thread: the files to the file server. Not
        acknowledged: FileService restarts it, and the next one serves the
        newest snapshot before it answers any read."""
        f = self.files
        server = f.pid if f is not None else None
        self.publish(snapshot)
        return (f is None or f.conn is not None), server

    async def _files_served(self, req: Request) -> list[str]:
        """Wait for the files of the request's commit; a warning when the
        file server has not taken them."""
        answer_by = req.started + ANSWER_WITHIN if req.op in CHANGES else math.inf
        got = await self.publisher.wait(req.published, max(answer_by - trio.current_time(), 0.0))
        if got is not None and got.acknowledged:
            return []
        f = self.files
        if got is None:
            pid = f.pid if f is not None else None
            line = (f"the change is committed, but the file server (pid {pid}) has not acknowledged its files after "
                    f"{trio.current_time() - req.started:.1f} s: reads show it once it answers, or once the one "
                    "that replaces it does (within a few seconds)")
        else:
            line = (f"the change is committed, but the file server (pid {got.server}) did not acknowledge its files: "
                    "it was restarted, and the new one serves them")
        log.warning("%s: %s", req.op, line)
        return [line]

    # --- kernel helpers ---------------------------------------------------
    def _endpoint(self, name: str, pid: int, ip: str, mac: str, answers: tuple[str, ...] = ()) -> Endpoint:
        return Endpoint(
            pid=pid,
            veth=veth_name(self.cfg.network.bridge, name),
            ip=ip,
            prefixlen=self.cfg.network.network.prefixlen,
            mac=mac,
            gateway=str(self.cfg.network.gateway),
            answers=tuple((a, model.mac_for(a)) for a in answers),
        )

    def topology(self, snap: StoreSnapshot) -> Topology:
        """The link graph of `snap`: from the last published one, rebuilt only
        where `snap` differs from it (every change touches a few names)."""
        pub = self._pub
        if pub is None:
            return plan.topology(snap, self.cfg.network.strategy)
        if snap is pub.snap:
            return pub.topo
        return plan.update_topology(pub.topo, pub.snap, snap, plan.delta_names(pub.snap, snap))

    async def apply_firewall(self, snap: StoreSnapshot) -> int:
        """Make the firewall match `snap`; returns the commits it took."""
        rs = rules.build(self.rule_settings, self.topology(snap), plan.forwards(snap, self.host))
        return await self.worker.run(self.firewall.apply, rs)

    async def _commit(self, d: Draft, undo=None, firewall_anyway: bool = False) -> StoreSnapshot:
        """The firewall of the state after the draft, then the commit. A
        failure of either puts the firewall back to the snapshot's rules and
        runs `undo` (the kernel steps taken for this change); the files and
        DNS follow the commit. `firewall_anyway`: rebuild the rules and
        publish even with nothing to commit (reconcile)."""
        if not d.change and not firewall_anyway:
            self.last_commits = 0
            return d.snap
        t0 = time.perf_counter()
        req = _REQUEST.get()
        try:
            self.last_commits = await self.apply_firewall(d.after())
            t1 = time.perf_counter()
            if req is not None:
                req.waited_for("the firewall", t1 - t0)
                if trio.current_time() > req.deadline:  # the hook is about to give up: nothing half-done
                    raise self._late(req)
            if d.change:
                self._holder_waits = self.store_thread.where
                snap = await self.store_thread.commit(d.change, d.snap.revision)
                self._holder_waits = ""
            else:
                snap = d.snap
            t2 = time.perf_counter()
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.apply_firewall(d.snap)
                except Exception:
                    log.exception("firewall: could not restore the rules of the committed state")
                if undo is not None:
                    await undo()
            raise
        self._publish(snap)
        self.steps.update(firewall=t1 - t0, store=t2 - t1, publish=time.perf_counter() - t2)
        if self.host and any(c is not None and not self._local(c) for c in d.change.containers.values()):
            try:  # another host's containers marked stopped (or running again) here
                await self.sync_overlay(snap)
            except Exception as e:  # noqa: BLE001 - committed: the next refresh tries again
                log.warning("overlay: could not update the forwarding entries: %s", e)
        return snap

    async def _after_commit(self, what: str, fn, *args) -> list[str]:
        """A kernel step the committed change no longer depends on: a failure
        is a warning, not an error."""
        try:
            await self.worker.run(fn, *args)
        except Exception as e:  # noqa: BLE001 - reported to the caller and the log
            log.warning("%s failed after the change was committed: %s", what, e)
            return [f"{what} failed: {e}"]
        return []

    def _publish(self, snap: StoreSnapshot) -> None:
        """Render the served files of `snap` and hand them to the file server
        (which invalidates what changed), and DNS its answers: the views are
        resolved once for both, and only for the names the change touches
        (theirs and their consumers'); every other file is the same object
        as in the last snapshot."""
        pub = self._pub
        r = render.resolv(*self._render_args())
        if pub is None:
            topo = plan.topology(snap, self.cfg.network.strategy)
            views = graph.views(topo)
            files = {name: render.fileset(v, r) for name, v in views.items()}
            dns_data = render.dns_data(topo, views)
        else:
            names = plan.delta_names(pub.snap, snap)
            topo = plan.update_topology(pub.topo, pub.snap, snap, names)
            touched = graph.affected(pub.topo, topo, names)
            views = graph.update_views(pub.views, topo, touched)
            files = render.update_files(pub.files, views, touched, r)
            dns_data = render.update_dns(pub.dns, pub.views, views, touched)
        self._pub = Published(snap, topo, views, files, dns_data)
        seq = self.publisher.submit(render.Snapshot(files, render.fileset(None, r), time.time_ns()))
        if (req := _REQUEST.get()) is not None:
            req.published = seq
        self.publish_dns(dns_data)

    def _render_args(self) -> tuple:
        return str(self.cfg.network.gateway), self.cfg.dns.enabled, tuple(self.cfg.dns.search)

    async def start(self) -> None:
        """Bridge, forwarding, base chains, then reconcile with the store."""
        await self.worker.run(self.wiring.ensure_bridge)
        if self.host:
            gw = str(self.cfg.network.gateway)
            await self.worker.run(self.wiring.ensure_overlay, self.cfg.cluster.vxlan_id, self.cfg.cluster.underlay,
                                  model.mac_for(gw))
        await self.worker.run(self.firewall.setup)
        await self.dispatch("reconcile", {})
        if self.host:
            await self.refresh()  # the overlay's entries (a new device has none), what others changed meanwhile

    def _local(self, c: model.Container) -> bool:
        """It runs (or ran) on this host."""
        return not self.host or c.host == self.host

    def _alive(self, c: model.Container) -> bool:
        """Its process is still the one that registered (same netns); on
        another host: that host is alive (its etcd lease), which sees to its
        own containers' processes."""
        if not self._local(c):
            return c.running and c.host in self.store.live_hosts()
        return bool(c.pid) and c.netns_ino is not None and netns_inode(c.pid) == c.netns_ino

    async def reconcile(self) -> dict:
        """The store is the truth: running containers whose netns is gone become
        stopped; live ones get their veth back if it went missing; veths on our
        bridge that belong to no running container are reported, never removed;
        the firewall chains are rebuilt and the files published (at start and
        on SIGHUP)."""
        rewired = []
        async with self._changing():
            d = Draft(await self._snapshot())
            stopped = plan.stop_dead(d, self._alive, time.time(), self.host)
            revived = plan.revive(d, self._alive, self.host, time.time()) if self.host else []
            keep = set()
            lent = d.answered()
            for c in d.containers():
                lease = d.ip_lease(c.name)
                if not c.running or lease is None or not self._local(c):
                    continue
                if lease.ip in lent:  # another answers at its address since a move: not a second one
                    keep.add(veth_name(self.cfg.network.bridge, c.name))  # (reassign: its veth stays)
                    continue
                ep = self._endpoint(c.name, c.pid, lease.ip, lease.mac, c.answers)
                keep.add(ep.veth)
                keep.update(self.wiring.answer_veth(a) for a in c.answers)
                if not await self.worker.run(self.wiring.veth_exists, ep.veth):
                    await self.worker.run(self.wiring.wire, ep)
                    rewired.append(c.name)
            # A veth lives as long as the netns of its other end: one on our
            # bridge that no running container of the store has is a live
            # container's all the same (a store rebuilt without it, a netns
            # pinned by a mount). Removing it would cut that container off.
            gone = {v for n in stopped for v in self._veths_of(d.snap.containers[n])}
            for veth in gone:  # their process is gone; a netns that outlives it keeps no veth of ours
                await self.worker.run(self.wiring.unwire, veth)
            unknown = [v for v in await self.worker.run(self.wiring.bridge_ports) if v not in keep and v not in gone]
            try:
                await self._commit(d, firewall_anyway=True)
            except StoreFull as e:
                # a start on a full disk (after a crash): serve the store as
                # it is, and refuse changes until there is space
                if d.change:
                    log.warning("reconcile: %s; serving the store as it is (what changed for %s is recorded once "
                                "there is space)", e, ", ".join(sorted(d.change.names())))
                stopped, revived = [], []
                await self._commit(Draft(d.snap), firewall_anyway=True)
        for n in stopped:
            log.info("reconcile: %s: netns gone, marked stopped", n)
        for n in revived:
            log.info("reconcile: %s: running here again (another host marked it stopped while this one was away)", n)
        for n in rewired:
            log.info("reconcile: %s: veth was missing, rewired", n)
        for v in unknown:
            log.warning("reconcile: %s on %s belongs to no running container of the store: kept, its other end "
                        "is in a live network namespace", v, self.cfg.network.bridge)
        return {"stopped": stopped, "rewired": rewired, "unknown_veths": unknown}

    async def stop_dead(self) -> list[str]:
        """Mark stopped every running container whose process is gone: a
        poststop that never came (a kill -9 of the runtime, its state
        deleted). Cheap when nothing died: one stat per running container."""
        snap = await self.store_thread.snapshot()
        lost = self.host and any(not c.running and c.host == self.host and c.pid for c in snap.containers.values())
        if not lost and not any(c.running and not self._alive(c) for c in snap.containers.values()):
            return []
        async with self._changing():
            d = Draft(await self._snapshot())
            # with etcd, as many as one transaction takes; the rest next round
            dead = plan.stop_dead(d, self._alive, time.time(), self.host, limit=100 if self.host else None)
            if lost and (back := plan.revive(d, self._alive, self.host, time.time())):
                log.warning("%s: running here again: the other hosts had marked them stopped while this host's "
                            "lease was expired", ", ".join(back))
            if d.change:
                await self._commit(d)
                for name in dead:  # the netns took the veth with it; this is for one that outlives it
                    if self._local(c := d.snap.containers[name]):
                        self.worker.submit(self.wiring.unwire_all, self._veths_of(c))
        for name in dead:
            c = d.snap.containers[name]
            if self._local(c):
                log.info("%s: its process is gone and no poststop came: marked stopped", name)
            else:
                log.info("%s: its host %s is gone (its etcd lease expired): marked stopped; its leases stay", name, c.host)
        return dead

    async def watch_liveness(self, interval: float = LIVENESS_INTERVAL, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        said = None
        while True:
            await trio.sleep(interval)
            try:
                await self.stop_dead()
                said = None
            except Conflict:  # another host marked them first, or committed meanwhile: next round
                continue
            except StoreError as e:  # locked for a moment, or etcd away: next round, said once
                if str(e) != said:
                    log.warning("liveness check: %s; trying again every %g s", e, interval)
                said = str(e)
            except Exception:
                log.exception("liveness check failed; trying again in %g s", interval)

    async def watch_store(self, changes: trio.MemoryReceiveChannel, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Another host committed (or came, or went): the firewall, files and
        DNS follow the store's new snapshot (several hosts)."""
        task_status.started()
        async for _ in changes:
            try:
                await self.refresh()
            except Conflict:
                continue
            except StoreError as e:
                log.warning("store: %s; the files keep the last snapshot", e)
            except Exception:
                log.exception("store: following another host's change failed")

    async def refresh(self) -> None:
        """The store's snapshot now: published (unless a local request did
        already), the overlay synced, and the facade flows of this host's
        consumers that another host's change moved away cut. Those two
        compare with what the last refresh saw, not with the last publish: a
        local request may have published another host's change first."""
        async with self._changing():
            snap = await self._snapshot()
            t0 = time.perf_counter()
            if self._pub is None or snap is not self._pub.snap:
                await self.apply_firewall(snap)
                self._publish(snap)
            await self.sync_overlay(snap)
            seen, self._seen = self._seen, self._pub.topo
            if seen is not None and (cuts := self._moved_away(seen, self._pub.topo)):
                # another host moved or removed links of this host's
                # consumers: their DNAT'ed flows are tracked here, not there
                await self._cut(cuts)
            log.debug("store: revision %d applied in %.1f ms", snap.revision, (time.perf_counter() - t0) * 1000)

    def _moved_away(self, old: Topology, new: Topology) -> list[list[str]]:
        """conntrack filters for the facade flows of this host's consumers
        whose link now goes elsewhere, or is gone."""
        if self.cfg.network.strategy != "facade":
            return []
        out = []
        for g in graph.changed_groups(old, new):
            if g not in new.groups:  # gone with its last link: the links say which flows (below)
                continue
            t = old.nodes.get(old.groups.get(g, ""))
            if t is not None and t.ip:  # a move: every link of the group
                out.append(("-d", self.cfg.network.facade_subnet, "-r", t.ip))
        if old.edges is not new.edges:
            now = {(e.consumer, e.alias): e for e in new.edges}
            for e in old.edges:
                n = now.get((e.consumer, e.alias))
                if e.facade and (n is None or n.group != e.group):  # removed, or retargeted: that one link
                    out.append(("-d", e.facade))
        return [list(f) for f in dict.fromkeys(out)]

    async def sync_overlay(self, snap: StoreSnapshot) -> None:
        """Several hosts: forwarding entries for the containers elsewhere."""
        if self.host:
            fdb, neigh = self.overlay_entries(snap)
            if n := await self.worker.run(self.wiring.sync_overlay, fdb, neigh):
                log.info("overlay: %d forwarding entries changed (%d hosts, %d remote containers)",
                         n, sum(1 for mac, _ in fdb if mac == ZERO_MAC), len(neigh))

    def overlay_entries(self, snap: StoreSnapshot) -> tuple[set[tuple[str, str]], dict[str, str]]:
        """The overlay's forwarding entries: each other live host for
        broadcasts (head-end replication), each container of another host at
        that host's underlay address; and those containers' addresses. A
        container whose host's lease expired keeps its entries (it may well
        run on, its daemon away): its address is its own until the pool runs
        out, and traffic to it must not stop because a daemon did."""
        live = {h for h in self.store.live_hosts() if h != self.host}
        underlays = {h: u for h, u in self.store.underlays.items() if h != self.host and u}
        fdb = {(ZERO_MAC, underlays[h]) for h in live if h in underlays}
        neigh = {}
        for c in snap.containers.values():
            lease = snap.ip_leases.get(c.name)
            if (c.running or c.pid) and lease is not None and c.host in underlays:
                fdb.add((lease.mac, underlays[c.host]))
                neigh[lease.ip] = lease.mac
        return fdb, neigh

    async def watch_firewall(self, interval: float = FIREWALL_INTERVAL, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Someone flushed or deleted tether's rules (`nft flush ruleset`,
        `iptables -t nat -F`, a firewalld reload): write them again, within
        `interval`, from what the driver last wrote (the store's state)."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            try:
                lost = await self.worker.run(self.firewall.heal)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("firewall: checking tether's rules failed; trying again in %g s", interval)
                continue
            if lost:
                log.warning("firewall: restored tether's rules; someone removed %s", "; ".join(lost))

    # --- hook operations --------------------------------------------------
    async def register(self, args: dict) -> dict:
        t0 = time.perf_counter()
        state, ann, spec = hook_input(args)
        reg = model.parse_registration(state, ann)
        ino = netns_inode(reg.pid)
        if ino is None:
            raise ServiceError(f"container {reg.id!r}: process {reg.pid} is gone: the container exited early")
        if self.files is not None and self.files.problem:
            raise ServiceError(
                f"tether's served files are not mounted ({self.files.problem}): the container could not get "
                "its /etc/hosts; restart tether-fused, which attaches the mount again"
            )
        if ino == _host_netns():
            raise ServiceError(
                f"container {reg.id!r} shares the host's network namespace: "
                'add {"type": "network"} to linux.namespaces in its config.json'
            )
        runtime = tuple(drift.runtime_of(args.get("ppid")))
        async with self._changing():
            d = Draft(await self._snapshot())
            done = plan.register(d, reg, ino, runtime, self.cfg.network, time.time(), self._alive, host_ports.in_use,
                                 self.host)
            t_plan = time.perf_counter()
            ep = self._endpoint(reg.name, reg.pid, done.ip, done.mac, d.container(reg.name).answers)
            if done.same_start:
                # the same start seen twice: its files are mounted already
                if not await self.worker.run(self.wiring.veth_exists, ep.veth):
                    await self.worker.run(self.wiring.wire, ep)
                return {"mounts": "", **self._summary(d.snap, reg.name)}
            mounts = self._mounts(reg, spec)
            await self.worker.run(self.wiring.wire, ep)
            self.steps = {"plan": t_plan - t0, "wire": time.perf_counter() - t_plan}

            async def unwire():
                await self.worker.run(self.wiring.unwire, ep.veth)

            snap = await self._commit(d, undo=unwire)
            for name in done.dead:  # found dead and marked stopped: a netns that outlives them keeps no veth
                self.worker.submit(self.wiring.unwire_all, self._veths_of(d.snap.containers[name]))
            if released := self._released(d):
                # a host port or an address that changed hands: a flow still
                # tracked for it (UDP above all: a client that keeps its source
                # port) would go on reaching the old holder. After the answer:
                # the new container has no flows yet.
                self.worker.submit(self._cut_quietly, released)
            # only the newest commit can be undone exactly (an undo applies
            # at the revision it made): one record, not one per container
            self._undo = {reg.id: Undo(reg.pid, inverse(d.snap, d.change), snap.revision)}
        for name in done.evicted:
            log.info("evicted %s for %s", name, reg.name)
        log.info(
            "registered %s (id %s, pid %d) at %s in %.1f ms (%s)",
            reg.name, reg.id, reg.pid, done.ip, (time.perf_counter() - t0) * 1000,
            ", ".join(f"{k} {v * 1000:.1f}" for k, v in self.steps.items()),
        )
        # first in the answer: the files the hook binds into the container
        # (those config.json does not mount already), for the hook to find
        # without a json module
        return {"mounts": mounts, **self._summary(snap, reg.name)}

    def _mounts(self, reg: model.Registration, spec: dict) -> str:
        """"PID\\0ROOTFS\\0SOURCE\\0DEST..." for the hook, or "" for nothing to mount."""
        binds = oci.missing_mounts(spec, self.cfg.fs_dir, reg.name, self.cfg.dns.enabled)
        if not binds:
            return ""
        root = oci.rootfs(spec, reg.bundle)
        if root is None or any(c in root for c in "\0\n"):
            raise ServiceError(
                f"cannot tell where {reg.name}'s root is (no readable root.path in {reg.bundle}/config.json): "
                "tether cannot mount its files there; fix config.json, or let `tether oci patch` write the mounts"
            )
        return "\0".join([str(reg.pid), root, *(str(p) for dest, source in binds for p in (source, dest))])

    async def abort(self, args: dict) -> dict:
        """The hook could not finish a start it registered (its mounts failed).
        When nothing was committed since, the registration is undone exactly
        (an evicted address or a taken-over port goes back); else a name that
        this start registered for the first time is forgotten, and any other
        is marked stopped, as by poststop."""
        state, _, _ = hook_input(args)
        cid, pid = state.get("id"), state.get("pid")
        undo = self._undo.pop(cid, None) if isinstance(cid, str) else None
        async with self._changing():
            d = Draft(await self._snapshot())
            c = d.find_running_by_id(cid) if isinstance(cid, str) else None
            if c is None or c.pid != pid:
                return {"known": False}
            if undo is not None and undo.pid == pid and d.snap.revision == undo.revision:
                d.change = undo.change
                how = "undone"
            elif c.created_at == c.started_at:  # its first start: nothing of it is worth keeping
                plan.remove(d, c.name)
                how = "forgotten"
            else:
                plan.stop(d, c.name, time.time())
                how = "marked stopped"
            await self._commit(d)
            warnings = await self._after_commit(f"removing {c.name}'s veth", self.wiring.unwire, veth_name(self.cfg.network.bridge, c.name))
        log.info("start of %s (id %s) failed in its hook: %s", c.name, cid, how)
        return {"known": True, "name": c.name, "done": how, **({"warnings": warnings} if warnings else {})}

    async def poststop(self, args: dict) -> dict:
        state, ann, _ = hook_input(args)
        cid = state.get("id")
        if isinstance(cid, str):
            self._undo.pop(cid, None)
        name = ann.get(model.ANN_NAME) if isinstance(ann, dict) else None
        async with self._changing():
            d = Draft(await self._snapshot())
            c = d.container(name) if model.is_label(name) else None
            if c is None or c.id != cid:
                c = d.find_running_by_id(cid) if isinstance(cid, str) else None
            if c is None or not c.running:
                return {"known": False}
            if self._alive(c):
                # its process still runs in its network namespace: a stray or
                # late poststop (of an earlier start under the same id) must
                # not take a live container's network away
                log.warning("poststop for %s (id %s) while its process %d runs: ignored", c.name, c.id, c.pid)
                return {"known": True, "name": c.name, "ignored": "its process is alive"}
            plan.stop(d, c.name, time.time())
            await self._commit(d)
            # The netns is gone or going, taking the veth with it; the explicit
            # delete (for a netns that outlives the container) need not delay
            # the runtime. Kernel calls run in order: a restart's wire() queues
            # after this.
            self.worker.submit(self.wiring.unwire_all, self._veths_of(c))
        log.info("stopped %s (id %s)", c.name, c.id)
        return {"known": True, "name": c.name}

    # --- CLI operations ---------------------------------------------------
    # What the control API answers is what the CLI prints: times in RFC 3339,
    # ports and links in model's notations (`Published`, `link_text`).
    def _summary(self, snap: StoreSnapshot, name: str) -> dict:
        c = snap.containers[name]
        lease = snap.ip_leases.get(name)
        ports = sorted((l for l in snap.port_leases.values() if l.name == name), key=lambda l: l.key)
        links = sorted(l for l in snap.links.values() if l.consumer == name)
        return {
            "name": c.name,
            "id": c.id,
            "state": c.state,
            "ip": lease.ip if lease else None,
            "mac": lease.mac if lease else None,
            "pid": c.pid,
            "expose": list(c.expose),
            "publish": list(c.publish),
            "links": [model.link_text(l.alias, snap.groups[l.group]) for l in links],
            "published": [str(model.Published(l.host_port, l.port, l.proto)) for l in ports],
            "started_at": rfc3339(c.started_at),
            "stopped_at": rfc3339(c.stopped_at),
            "answers": list(c.answers),  # others' addresses it answers at since a move (veth-move, reassign)
            **({"host": c.host} if self.host else {}),  # several hosts: where it runs or last ran
            "note": c.note,
        }

    def _leases(self, snap: StoreSnapshot, name: str | None = None) -> list[dict]:
        out = []
        for lease in plan.lease_rows(snap):
            if name is not None and lease["name"] != name:
                continue
            if lease["kind"] == "port":  # the plan's maps: "proto:port"
                proto, _, port = lease["maps"].partition(":")
                lease["maps"] = str(model.Published(int(lease["lease"]), int(port), proto))
            lease["stopped_at"] = rfc3339(lease["stopped_at"])
            lease["since"] = rfc3339(lease["since"])
            out.append(lease)
        return out

    async def ps(self, args: dict) -> list[dict]:
        snap = await self._view()
        return [self._summary(snap, name) for name in sorted(snap.containers)]

    def _named(self, snap: StoreSnapshot, args: dict) -> model.Container:
        name = model.check_label(args.get("name"))
        c = snap.containers.get(name)
        if c is None:
            raise ServiceError(f"no container named {name!r}: see `tether ps`")
        return c

    async def inspect(self, args: dict) -> dict:
        snap = await self._view()
        c = self._named(snap, args)
        out = self._summary(snap, c.name)
        out["leases"] = self._leases(snap, c.name)
        out["veth"] = veth_name(self.cfg.network.bridge, c.name)
        topo = self.topology(snap)
        groups = {g for g, t in topo.groups.items() if t == c.name}
        out["links_in"] = [model.link_text(e.alias, c.name, e.consumer) for e in topo.edges if e.group in groups]
        pub = self._pub
        if pub is not None and pub.snap is snap and c.name in pub.files:
            fs = pub.files[c.name]
        else:
            fs = render.render_all(topo, *self._render_args())[0][c.name]
        out["files"] = {f: fs.get(f).decode() for f in render.FILES}
        return out

    async def leases(self, args: dict) -> list[dict]:
        return self._leases(await self._view())

    async def rm(self, args: dict) -> dict:
        async with self._changing():
            d = Draft(await self._snapshot())
            c = self._named(d.snap, args)
            if c.running and self._alive(c):
                raise ServiceError(f"container {c.name!r} is running: stop it first (runc kill, runc delete)")
            lease = d.ip_lease(c.name)
            # addresses it answered at for others (a move) go home to a
            # running owner; an owner that is stopped takes it at its start
            owners = {l.ip: l.name for l in d.ip_leases() if l.ip in c.answers}
            plan.remove(d, c.name, time.time())
            await self._commit(d)
            if released := self._released(d):
                self.worker.submit(self._cut_quietly, released)
            # (a dying netns can take a while: its interface that answered at
            # an address must not go on answering next to the owner's)
            warnings = await self._after_commit(f"removing {c.name}'s veth", self.wiring.unwire_all, self._veths_of(c))
            for ip, owner in owners.items():
                o = d.snap.containers[owner]
                if self._pid_if_alive(o) is not None:
                    warnings += await self._after_commit(
                        f"giving {ip} back to {owner}", self.wiring.answer, ip, model.mac_for(ip), o.pid,
                        veth_name(self.cfg.network.bridge, owner))
        freed = [lease.ip] if lease else []
        log.info("removed %s, freed %s", c.name, ", ".join(freed) or "nothing")
        return {"name": c.name, "freed": freed, **({"warnings": warnings} if warnings else {})}

    # --- links --------------------------------------------------------------
    def _link_row(self, topo: Topology, e: Edge) -> dict:
        r = resolve_edge(topo, e)
        return {
            "link": model.link_text(e.alias, r.target, e.consumer),
            "consumer": e.consumer,
            "alias": e.alias,
            "target": r.target,
            "state": r.state,
            "address": r.address,
            "ports": [str(p) for p in r.ports],
        }

    def _can_cut(self) -> None:
        """Refuse, before the commit, a change whose old connections could not be cut."""
        if (problem := self.wiring.cut_problem()) is not None:
            raise ServiceError(problem)

    @staticmethod
    def _released(d: Draft) -> list[list[str]]:
        """conntrack filters for what `d` takes from its holder: a host port
        that changes hands or is freed (the flows DNAT'ed to the old holder's
        address), and an address that is freed or given to another (the flows
        whose replies come from it)."""
        out = []
        for (port, proto), new in d.change.port_leases.items():
            old = d.snap.port_leases.get((port, proto))
            if old is not None and (new is None or old.name != new.name):
                ip = d.snap.ip_leases.get(old.name)
                out.append(["-p", proto, "--orig-port-dst", str(port), *(["-r", ip.ip] if ip else [])])
        lent = None
        for name, new in d.change.ip_leases.items():
            old = d.snap.ip_leases.get(name)
            if old is not None and (new is None or new.ip != old.ip):
                if lent is None:
                    lent = d.answered()
                if old.ip not in lent:  # one another answers at since a move keeps its flows
                    out.append(["-r", old.ip])
        return out

    def _cut_quietly(self, filters: list[list[str]]) -> None:
        """On the kernel thread, after a registration answered: a failure is logged."""
        try:
            log.info("conntrack: %d entries of host ports or addresses that changed hands removed", self.wiring.cut(filters))
        except Exception as e:  # noqa: BLE001 - the change went through; the old flows time out
            log.warning("conntrack: could not remove the flows of host ports or addresses that changed hands: %s", e)

    async def _cut(self, filters: list[list[str]]) -> list[str]:
        """Cut the connections that went to the old targets (after the commit)."""
        if not filters:
            return []
        try:
            n = await self.worker.run(self.wiring.cut, filters)
        except Exception as e:  # noqa: BLE001 - the change is committed: a warning
            log.warning("conntrack: could not cut the old connections: %s", e)
            return [f"the old connections were not cut ({e}): they end when they time out"]
        log.info("conntrack: removed %d entries", n)
        return []

    async def link_add(self, args: dict) -> dict:
        async with self._changing():
            consumer = model.check_label(args.get("consumer"), "consumer name")
            target = model.check_label(args.get("target"), "target name")
            alias = model.check_label(args.get("alias") or target, "alias")
            d = Draft(await self._snapshot())
            link = plan.link_add(d, consumer, target, alias, self.cfg.network)
            snap = await self._commit(d)
            return self._link_row(self.topology(snap), link)

    async def link_rm(self, args: dict) -> dict:
        async with self._changing():
            consumer = model.check_label(args.get("consumer"), "consumer name")
            alias = model.check_label(args.get("alias"), "alias")
            d = Draft(await self._snapshot())
            plan.consumer(d, consumer)
            link = plan.existing_link(d, consumer, alias)
            target = d.target(link)
            if link.facade:
                self._can_cut()
            d.delete_link(consumer, alias)
            await self._commit(d)
            warnings = await self._cut([["-d", link.facade]] if link.facade else [])
            return {
                "link": model.link_text(alias, target, consumer), "consumer": consumer, "alias": alias,
                "target": target, **({"warnings": warnings} if warnings else {}),
            }

    async def link_retarget(self, args: dict) -> dict:
        async with self._changing():
            consumer = model.check_label(args.get("consumer"), "consumer name")
            alias = model.check_label(args.get("alias"), "alias")
            target = model.check_label(args.get("target"), "target name")
            d = Draft(await self._snapshot())
            before, previous, after = plan.link_retarget(d, consumer, alias, target, bool(args.get("allow_dangling")))
            if after != before and before.facade:
                self._can_cut()
            snap = await self._commit(d)
            warnings = await self._cut([["-d", before.facade]]) if after != before and before.facade else []
            out = self._link_row(self.topology(snap), after)
            out["previous"] = previous
            out["firewall_commits"] = self.last_commits
            if warnings:
                out["warnings"] = warnings
            return out

    async def move(self, args: dict) -> dict:
        """Failover: every link to OLD now goes to NEW, and OLD's published
        host ports forward to NEW; one transaction, one firewall commit."""
        async with self._changing():
            t0, self.steps = time.perf_counter(), {}
            old = model.check_label(args.get("old"), "container name")
            new = model.check_label(args.get("new"), "container name")
            d = Draft(await self._snapshot())
            strategy = self.cfg.network.strategy
            moved = plan.move(d, old, new, strategy, self._alive, time.time())
            old_lease = d.snap.ip_leases.get(old)
            if old_lease is not None and ((moved.links and strategy == "facade") or moved.ports):
                self._can_cut()
            handed: list[plan.Handover] = []
            if moved.addresses:
                # before the commit: NEW answers as early as it can, and a
                # failure changes nothing (what was handed goes back)
                t_hand = time.perf_counter()
                handed = await self._hand_over(d, moved.addresses)
                self.steps["hand over"] = time.perf_counter() - t_hand

            async def hand_back():
                await self._hand_back(d, handed)

            await self._commit(d, undo=hand_back if handed else None)
            warnings = []
            if old_lease is not None:
                # connections through any facade, or a host port, answered by OLD
                # (a facade's flows are DNAT'ed to OLD; without facades the
                # consumers' flows are their own, to an address: none to cut)
                cuts = [["-d", self.cfg.network.facade_subnet, "-r", old_lease.ip]] if moved.links and strategy == "facade" else []
                cuts += [["-p", l.proto, "--orig-port-dst", str(l.host_port), "-r", old_lease.ip] for l in moved.ports]
                t_cut = time.perf_counter()
                warnings += await self._cut(cuts)
                self.steps["cut"] = time.perf_counter() - t_cut
            log.info(
                "moved %s to %s (%d links, %d ports) in %.1f ms (%s)", old, new, len(moved.links), len(moved.ports),
                (time.perf_counter() - t0) * 1000, ", ".join(f"{k} {v * 1000:.1f}" for k, v in self.steps.items()),
            )
            out = {
                "old": old,
                "new": new,
                "links": len(moved.links),
                "moved": [model.link_text(l.alias, new, l.consumer) for l in moved.links],
                "ports": [str(model.Published(l.host_port, l.port, l.proto)) for l in moved.ports],
                "addresses": [{"ip": h.ip, "from": h.giver, "to": h.taker} for h in moved.addresses],
                "firewall_commits": self.last_commits,
            }
            if warnings:
                out["warnings"] = warnings
            return out

    def _veths_of(self, c: model.Container) -> list[str]:
        """Its own veth, and those it answers at others' addresses on (veth-move)."""
        return [veth_name(self.cfg.network.bridge, c.name), *(self.wiring.answer_veth(a) for a in c.answers)]

    def _pid_if_alive(self, c: model.Container) -> int | None:
        return c.pid if c.running and self._alive(c) else None

    async def _hand_over(self, d: Draft, handed: tuple[plan.Handover, ...]) -> list[plan.Handover]:
        """The kernel side of a move's address handovers (veth-move,
        reassign), before its commit. A failure hands back what was handed
        and refuses the move in one line."""
        done: list[plan.Handover] = []
        for h in handed:
            giver, taker = d.snap.containers[h.giver], d.snap.containers[h.taker]
            home = veth_name(self.cfg.network.bridge, h.taker) if h.home else None
            own = _owns(d, h.giver, h.ip)
            try:
                how = await self.worker.run(self.wiring.hand_over, h.ip, h.mac, self._pid_if_alive(giver),
                                            taker.pid, home, own)
            except Exception as e:
                await self._hand_back(d, [*done, h])  # this one too: it may have got halfway
                raise ServiceError(f"{h.taker} could not take over {h.ip}: {e}; nothing was moved") from None
            done.append(h)
            log.info("move: %s answers at %s instead of %s (%s: %s)", h.taker, h.ip, h.giver, self.cfg.network.strategy, how)
        return done

    async def _hand_back(self, d: Draft, handed: list[plan.Handover]) -> None:
        """Undo handovers (a move that failed after them)."""
        for h in reversed(handed):
            giver, taker = d.snap.containers[h.giver], d.snap.containers[h.taker]
            back_to = self._pid_if_alive(giver)
            own = _owns(d, h.giver, h.ip)
            home = veth_name(self.cfg.network.bridge, h.giver) if own else None
            try:
                if back_to is None:  # nobody to give it back to: the taker must not keep it unrecorded
                    await self.worker.run(self.wiring.unanswer, h.ip, taker.pid)
                else:
                    await self.worker.run(self.wiring.hand_over, h.ip, h.mac, taker.pid, back_to, home, h.home, False)
            except Exception as e:  # noqa: BLE001 - the failure being handled is the one to report
                log.warning("move: could not give %s back to %s: %s", h.ip, h.giver, e)

    async def link_ls(self, args: dict) -> list[dict]:
        topo = self.topology(await self._view())
        return [self._link_row(topo, e) for e in topo.edges]

    async def health(self, args: dict) -> dict:
        """The served files' state, for `tether ps` and `tether doctor`."""
        f = self.files
        return {
            "files": "ok" if f is None or not f.problem else f.problem,
            "file_server": f.pid if f is not None else None,
            "file_server_restarts": f.restarts if f is not None else 0,
            "passthrough": f.passthrough if f is not None else None,
        }

    async def drift(self, args: dict) -> list[dict]:
        """Containers the runtimes run while tether has them stopped (or never
        registered them), and the reverse: see fused/drift.py."""
        since = time.time()  # the lists first, then the records: a start or stop meanwhile is left out
        listings = await drift.listings({c.runtime for c in (await self._view()).containers.values() if c.runtime})
        snap = await self._view()
        rows = [
            {"name": c.name, "id": c.id, "state": c.state, "runtime": list(c.runtime),
             "changed": max(c.started_at or 0, c.stopped_at or 0)}
            for c in snap.containers.values()
        ]
        source = str(self.cfg.source) if self.cfg.source else None
        ours = drift.claimed_by(source, config_mod.DEFAULT_PATH)
        found = drift.compare(sorted(rows, key=lambda r: r["name"]), listings, ours, since)
        return [dataclasses.asdict(x) for x in found]

    OPS = (
        "register", "abort", "poststop", "ps", "inspect", "leases", "rm", "reconcile", "health", "drift",
        "link_add", "link_rm", "link_retarget", "link_ls", "move",
    )

    async def dispatch(self, op: str, args: dict):
        if op not in self.OPS:
            raise InputError(f"unknown operation {op[:40]!r}: upgrade the tether client to match the daemon")
        now = trio.current_time()
        req = Request(op, now, now + CHANGE_DEADLINE if op in CHANGES else math.inf)
        token = _REQUEST.set(req)
        try:
            result = await self._attempts(op, args, req)
        except (StoreError, DeadlineError) as e:
            if op in CHANGES and not isinstance(e, Conflict):  # expected, and said to the asker: one line here too
                log.warning("%s refused: %s", op.replace("_", " "), e)
            raise
        finally:
            _REQUEST.reset(token)
        if req.published:
            warnings = await self._files_served(req)
            if warnings and isinstance(result, dict):
                result["warnings"] = [*result.get("warnings", ()), *warnings]
        return result

    async def _attempts(self, op: str, args: dict, req: Request):
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                if op == "reconcile":
                    return await self.reconcile()
                return await getattr(self, op)(args)
            except Conflict as e:
                # another host committed between this plan's snapshot and its
                # commit (whose kernel steps were undone): plan again
                if attempt == CONFLICT_ATTEMPTS:
                    raise ServiceError(
                        f"{op}: the store changed under it {attempt} times in a row (other hosts are writing): "
                        "try again"
                    ) from None
                log.info("%s: %s (attempt %d of %d)", op, e, attempt, CONFLICT_ATTEMPTS)
                await trio.sleep(random.uniform(0, 0.002 * attempt))


def _owns(d: Draft, name: str, ip: str) -> bool:
    """`ip` is `name`'s own address (its lease) before the draft's change."""
    lease = d.snap.ip_leases.get(name)
    return lease is not None and lease.ip == ip
