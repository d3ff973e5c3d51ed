"""The one place where a request becomes: validate -> store txn -> kernel -> publish.

Every operation holds `self.lock`: one writer, and readers never see a
transaction half done. A kernel failure inside a transaction rolls the store
back and undoes the wiring, so a failed registration leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time

import trio

from . import allocator, drift, model, oci, render, rules
from .allocator import Holder
from . import config as config_mod
from .config import Config
from .graph import Edge, Node, Topology, resolve_edge
from .model import InputError
from .net import ports as host_ports
from .net.firewall import Firewall
from .net.wiring import Endpoint, Wiring, Worker, netns_inode, veth_name
from .store.sqlite import ContainerRow, SqliteStore

log = logging.getLogger("tether.service")


class ServiceError(Exception):
    """A request that cannot be done; the message names the cause and the fix."""


def rfc3339(ts: float | None) -> str | None:
    """A stored time (epoch seconds) as the control API gives it."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _host_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


MAX_STATE = 1 << 20
MAX_BUSY_SKIPS = 256
MAX_FRESH = 4096


def hook_input(args: dict) -> tuple[dict, dict | None, dict]:
    """The OCI state a hook sent (unparsed, as `state_json`), its annotations
    (the state's own, else those of `bundle/config.json`) and the bundle's
    config.json ({} when it cannot be read)."""
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
    bundle = state.get("bundle")
    spec: dict = {}
    if isinstance(bundle, str) and os.path.isabs(bundle):
        try:
            with open(os.path.join(bundle, "config.json"), "rb") as f:
                loaded = json.loads(f.read(16 << 20))
            spec = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError, RecursionError):
            pass
    if not ann and isinstance(spec.get("annotations"), dict):
        ann = spec["annotations"]
    return state, ann, spec


class Service:
    def __init__(
        self,
        cfg: Config,
        store: SqliteStore,
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
        self.store = store
        self.wiring = wiring
        self.firewall = firewall
        self.worker = worker
        self.lock = trio.Lock()
        self.net = cfg.network.network
        self.last_commits = 0
        # OCI id -> name of registrations that created their record, until
        # the container stops: what an `abort` from the hook forgets
        self._fresh: dict[str, str] = {}

    # --- kernel helpers ---------------------------------------------------
    def _endpoint(self, name: str, pid: int, ip: str, mac: str) -> Endpoint:
        return Endpoint(
            pid=pid,
            veth=veth_name(self.cfg.network.bridge, name),
            ip=ip,
            prefixlen=self.net.prefixlen,
            mac=mac,
            gateway=str(self.cfg.network.gateway),
        )

    def _forwards(self, containers: list[ContainerRow] | None = None) -> list[rules.PortForward]:
        rows = {r.name: r for r in (containers if containers is not None else self.store.containers())}
        return [
            rules.PortForward(hp, proto, rows[name].ip, port)
            for hp, proto, name, port in self.store.port_leases()
            if rows[name].running and rows[name].ip
        ]

    async def apply_firewall(self, topo: Topology | None = None, containers: list[ContainerRow] | None = None) -> int:
        """Make the firewall match the store; returns the commits it took."""
        rs = rules.build(rules.RuleSettings.of(self.cfg.network), topo or self.topology(containers), self._forwards(containers))
        return await self.worker.run(self.firewall.apply, rs)

    @contextlib.asynccontextmanager
    async def _change(self):
        """One store transaction whose firewall follows it: the firewall is
        applied before the commit (a failure rolls the store back and puts
        the firewall back in line); the files are published after it."""
        try:
            with self.store.transaction():
                yield
                rows = self.store.containers()
                topo = self.topology(rows)
                self.last_commits = await self.apply_firewall(topo, rows)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await self.apply_firewall()
                except Exception:
                    log.exception("firewall: could not restore the rules of the committed state")
            raise
        self._publish(topo)

    def topology(self, containers: list[ContainerRow] | None = None) -> Topology:
        rows = containers if containers is not None else self.store.containers()
        nodes = {r.name: Node(r.name, r.ip, r.running, model.exposed(tuple(r.expose))) for r in rows}
        return Topology(nodes, tuple(Edge(*row) for row in self.store.links()), self.cfg.network.strategy)

    def _publish(self, topo: Topology | None = None) -> None:
        """Render every served file from the store's current state and hand the
        snapshot to the filesystem (which invalidates what changed)."""
        topo = topo or self.topology()
        files, default = render.render_all(topo, *self._render_args())
        self.publish(render.Snapshot(files, default, time.time_ns()))
        self.publish_dns(render.dns_data(topo))

    def _render_args(self) -> tuple:
        return str(self.cfg.network.gateway), self.cfg.dns.enabled, tuple(self.cfg.dns.search)

    async def start(self) -> None:
        """Bridge, forwarding, base chains, then reconcile with the store."""
        await self.worker.run(self.wiring.ensure_bridge)
        await self.worker.run(self.firewall.setup)
        await self.reconcile()

    def _alive(self, row: ContainerRow) -> bool:
        return bool(row.pid) and row.netns_ino is not None and netns_inode(row.pid) == row.netns_ino

    async def reconcile(self) -> dict:
        """The store is the truth: running containers whose netns is gone become
        stopped; live ones get their veth back if it went missing; veths on our
        bridge that belong to no running container are removed; the firewall
        chains are rebuilt and the files published (at start and on SIGHUP)."""
        stopped, rewired = [], []
        async with self.lock:
            async with self._change():  # then the firewall and the files follow
                keep = set()
                for row in self.store.containers():
                    if not row.running:
                        continue
                    if not self._alive(row):
                        self.store.mark_stopped(row.name)
                        stopped.append(row.name)
                        continue
                    ep = self._endpoint(row.name, row.pid, row.ip, row.mac)
                    keep.add(ep.veth)
                    if not await self.worker.run(self.wiring.veth_exists, ep.veth):
                        await self.worker.run(self.wiring.wire, ep)
                        rewired.append(row.name)
                for veth in await self.worker.run(self.wiring.bridge_ports):
                    if veth not in keep:
                        await self.worker.run(self.wiring.unwire, veth)
        for n in stopped:
            log.info("reconcile: %s: netns gone, marked stopped", n)
        for n in rewired:
            log.info("reconcile: %s: veth was missing, rewired", n)
        return {"stopped": stopped, "rewired": rewired}

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
        runtime = drift.runtime_of(args.get("ppid"))
        async with self.lock:
            wired: list[str] = []
            try:
                result = await self._register(reg, ino, wired, runtime)
            except BaseException:
                with trio.CancelScope(shield=True):
                    for veth in wired:  # nothing left behind
                        await self.worker.run(self.wiring.unwire, veth)
                raise
        log.info(
            "registered %s (id %s, pid %d) at %s in %.1f ms",
            reg.name, reg.id, reg.pid, result["ip"], (time.perf_counter() - t0) * 1000,
        )
        # first in the answer: the files the hook binds into the container
        # (those config.json does not mount already), for the hook to find
        # without a json module
        mounts = self._mounts(reg, spec) if result.pop("first_start", True) else ""
        return {"mounts": mounts, **result}

    def _mounts(self, reg: model.Registration, spec: dict) -> str:
        """"PID\0ROOTFS\0SOURCE\0DEST..." for the hook, or "" for nothing to mount."""
        binds = oci.missing_mounts(spec, self.cfg.fs_dir, reg.name, self.cfg.dns.enabled)
        root = oci.rootfs(spec, reg.bundle)
        if not binds or root is None or any(c in root for c in "\0\n"):
            return ""
        return "\0".join([str(reg.pid), root, *(str(p) for b in binds for p in (b[1], b[0]))])

    async def _register(self, reg: model.Registration, ino: int, wired: list[str], runtime: list[str]) -> dict:
        async with self._change():
            row = self.store.get(reg.name)
            if row and row.running:
                if row.pid == reg.pid and row.netns_ino == ino:
                    # the same start seen twice (prestart + createRuntime, or a
                    # retry): its files are mounted already
                    ep = self._endpoint(reg.name, reg.pid, row.ip, row.mac)
                    if not await self.worker.run(self.wiring.veth_exists, ep.veth):
                        await self.worker.run(self.wiring.wire, ep)
                    return {**self._summary(self.store.get(reg.name)), "first_start": False}
                if self._alive(row):
                    raise ServiceError(
                        f"name {reg.name!r} is already used by running container {row.id!r}: "
                        f"stop it first or choose another {model.ANN_NAME}"
                    )
            ip = self._lease_address(reg.name, row)
            mac = model.mac_for(ip)
            self.store.upsert_running(
                reg.name,
                reg.id,
                reg.pid,
                ino,
                reg.bundle,
                [str(p) for p in reg.expose],
                [str(p) for p in reg.publish],
                runtime,
            )
            if row is None:
                self._fresh[reg.id] = reg.name
                while len(self._fresh) > MAX_FRESH:  # poststops that never came: forget the oldest
                    self._fresh.pop(next(iter(self._fresh)))
            self.store.set_ip_lease(reg.name, ip, mac)
            self.store.set_note(reg.name, "")
            self._lease_ports(reg.name, reg.publish)
            for link in reg.links:
                # links changed at run time (retarget) win over the annotation
                if self.store.get_link(reg.name, link.alias) is None:
                    self._add_link(reg.name, link.alias, link.target)
            ep = self._endpoint(reg.name, reg.pid, ip, mac)
            wired.append(ep.veth)
            await self.worker.run(self.wiring.wire, ep)
            result = self._summary(self.store.get(reg.name))
        return result

    def _lease_address(self, name: str, row: ContainerRow | None) -> str:
        held = {ip: Holder(n, running, stopped_at) for ip, n, running, stopped_at in self.store.ip_holders()}
        try:
            choice = allocator.choose(allocator.address_pool(self.net), held, name, row.ip if row else None)
        except allocator.Exhausted:
            raise ServiceError(
                f"address pool exhausted: every address of {self.net} is held by a running container; "
                "stop one, or enlarge network.subnet in the config"
            ) from None
        if choice.evict:
            self.store.drop_ip_lease(choice.evict)
            self.store.set_note(
                choice.evict,
                f"evicted: address {choice.key} given to {name} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
                "it gets a new address on its next start",
            )
            log.info("evicted %s from %s for %s", choice.evict, choice.key, name)
        return choice.key

    def _lease_ports(self, name: str, publish: list[model.PublishSpec]) -> None:
        """Sticky host ports per (name, port, proto): explicit ones claimed
        (taken over from a stopped holder), others chosen like addresses."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for spec in publish:
            mine = [hp for hp, proto, _, port in self.store.port_leases(name) if (port, proto) == (spec.port, spec.proto)]
            if spec.host_port is None and mine:
                if not host_ports.in_use(mine[0], spec.proto):
                    continue
                # a host process took the sticky port while the container was
                # stopped: never taken over, so the container gets another one
                self.store.drop_port_lease(mine[0], spec.proto)
                log.info("%s: host port %s/%s is held by a host process now: choosing another", name, mine[0], spec.proto)
                self.store.set_note(name, f"host port {mine[0]}/{spec.proto} was taken by a host process while {name} "
                                    f"was stopped: it got another at {now}")
                mine = []
            if spec.host_port is not None and spec.host_port in mine and not host_ports.in_use(spec.host_port, spec.proto):
                continue
            held = {hp: Holder(n, running, stopped_at) for hp, n, running, stopped_at in self.store.port_holders(spec.proto)}
            if spec.host_port is not None and host_ports.in_use(spec.host_port, spec.proto):
                raise ServiceError(
                    f"host port {spec.host_port}/{spec.proto}: listen {spec.proto} 0.0.0.0:{spec.host_port}: bind: "
                    "address already in use (a host process holds it): publish another host port, "
                    "or leave the host port out for a free one"
                )
            try:
                if spec.host_port is not None:
                    choice = allocator.claim(spec.host_port, held, name)
                else:
                    choice = allocator.choose(self.cfg.network.ports, held, name)
                    for _ in range(MAX_BUSY_SKIPS):  # a port a host process uses is skipped like a running holder's
                        if not host_ports.in_use(choice.key, spec.proto):
                            break
                        held[choice.key] = Holder("(a host process)", True, None)
                        choice = allocator.choose(self.cfg.network.ports, held, name)
            except allocator.HeldByRunning as e:
                raise ServiceError(
                    f"host port {spec.host_port}/{spec.proto} is held by running container {e.holder!r}: "
                    "stop it, publish another host port, or leave the host port out for a free one"
                ) from None
            except allocator.Exhausted:
                raise ServiceError(
                    f"host port pool exhausted: every {spec.proto} port of {self.cfg.network.port_range} is held "
                    "by a running container; stop one, or enlarge network.port_range"
                ) from None
            if choice.evict:
                self.store.set_note(choice.evict, f"evicted: host port {choice.key}/{spec.proto} given to {name} at {now}")
                log.info("host port %s/%s taken from %s for %s", choice.key, spec.proto, choice.evict, name)
            if spec.host_port is not None:
                for hp in mine:  # the spec changed from an automatic port to this one
                    self.store.drop_port_lease(hp, spec.proto)
            self.store.set_port_lease(choice.key, spec.proto, name, spec.port)

    def _facade(self) -> str | None:
        if self.cfg.network.strategy != "facade":
            return None
        used = self.store.facades()
        for addr in self.cfg.network.facade_network.hosts():  # no gateway here: from .1
            if (ip := str(addr)) not in used:
                return ip
        raise ServiceError(
            f"facade pool exhausted: every address of {self.cfg.network.facade_subnet} belongs to a link; "
            "remove links or enlarge network.facade_subnet"
        )

    def _group(self, target: str) -> str:
        """A link group for a link to `target`: one whose links all go to it."""
        n = 0
        while True:
            g = target if n == 0 else f"{target}#{n}"
            if self.store.group_targets(g) <= {target}:
                return g
            n += 1

    def _add_link(self, consumer: str, alias: str, target: str) -> None:
        self.store.add_link(consumer, alias, target, self._facade(), self._group(target))

    async def _cut(self, filters: list[list[str]]) -> None:
        """Cut the connections that went to the old targets (after the commit)."""
        if filters:
            n = await self.worker.run(self.wiring.cut, filters)
            log.info("conntrack: removed %d entries", n)

    async def abort(self, args: dict) -> dict:
        """The hook could not finish a start it registered (its mounts failed):
        a name this start registered for the first time is forgotten (its
        leases freed), any other is marked stopped, as by poststop."""
        state, _, _ = hook_input(args)
        name = self._fresh.pop(state.get("id"), None) if isinstance(state.get("id"), str) else None
        if name is None:
            return await self.poststop(args)
        async with self.lock:
            row = self.store.get(name)
            if row is None or row.id != state.get("id"):
                return {"known": False}
            async with self._change():
                self.store.delete(name)
            self.worker.submit(self.wiring.unwire, veth_name(self.cfg.network.bridge, name))
        log.info("start of %s (id %s) failed in its hook: forgotten", name, row.id)
        return {"known": True, "name": name}

    async def poststop(self, args: dict) -> dict:
        state, ann, _ = hook_input(args)
        if isinstance(state.get("id"), str):
            self._fresh.pop(state["id"], None)
        name = ann.get(model.ANN_NAME) if isinstance(ann, dict) else None
        cid = state.get("id")
        async with self.lock:
            row = self.store.get(name) if model.is_label(name) else None
            if row is None or row.id != cid:
                row = self.store.find_running_by_id(cid) if isinstance(cid, str) else None
            if row is None or not row.running:
                return {"known": False}
            async with self._change():
                self.store.mark_stopped(row.name)
            # The netns is gone or going, taking the veth with it; the explicit
            # delete (for a netns that outlives the container) need not delay
            # the runtime. Kernel calls run in order: a restart's wire() queues
            # after this.
            self.worker.submit(self.wiring.unwire, veth_name(self.cfg.network.bridge, row.name))
        log.info("stopped %s (id %s)", row.name, row.id)
        return {"known": True, "name": row.name}

    # --- CLI operations ---------------------------------------------------
    # What the control API answers is what the CLI prints: times in RFC 3339,
    # ports and links in model's notations (`Published`, `link_text`).
    def _summary(self, row: ContainerRow) -> dict:
        return {
            "name": row.name,
            "id": row.id,
            "state": row.state,
            "ip": row.ip,
            "mac": row.mac,
            "pid": row.pid,
            "expose": row.expose,
            "publish": row.publish,
            "links": [model.link_text(e.alias, e.target) for e in map(Edge._make, self.store.links(row.name))],
            "published": [str(model.Published(hp, port, proto)) for hp, proto, _, port in self.store.port_leases(row.name)],
            "started_at": rfc3339(row.started_at),
            "stopped_at": rfc3339(row.stopped_at),
            "note": row.note,
        }

    def _leases(self, name: str | None = None) -> list[dict]:
        out = []
        for lease in self.store.leases():
            if name is not None and lease["name"] != name:
                continue
            if lease["kind"] == "port":  # the store's maps: "proto:port"
                proto, _, port = lease["maps"].partition(":")
                lease["maps"] = str(model.Published(int(lease["lease"]), int(port), proto))
            lease["stopped_at"] = rfc3339(lease["stopped_at"])
            lease["since"] = rfc3339(lease["since"])
            out.append(lease)
        return out

    async def ps(self, args: dict) -> list[dict]:
        async with self.lock:
            return [self._summary(r) for r in self.store.containers()]

    async def _row(self, args: dict) -> ContainerRow:
        name = model.check_label(args.get("name"))
        row = self.store.get(name)
        if row is None:
            raise ServiceError(f"no container named {name!r}: see `tether ps`")
        return row

    async def inspect(self, args: dict) -> dict:
        async with self.lock:
            row = await self._row(args)
            out = self._summary(row)
            out["leases"] = self._leases(row.name)
            out["veth"] = veth_name(self.cfg.network.bridge, row.name)
            topo = self.topology()
            out["links_in"] = [model.link_text(e.alias, e.target, e.consumer) for e in topo.edges if e.target == row.name]
            files, _ = render.render_all(topo, *self._render_args())
            fs = files[row.name]
            out["files"] = {f: fs.get(f).decode() for f in render.FILES}
            return out

    async def leases(self, args: dict) -> list[dict]:
        async with self.lock:
            return self._leases()

    async def rm(self, args: dict) -> dict:
        async with self.lock:
            row = await self._row(args)
            if row.running and self._alive(row):
                raise ServiceError(f"container {row.name!r} is running: stop it first (runc kill, runc delete)")
            async with self._change():
                self.store.delete(row.name)
                await self.worker.run(self.wiring.unwire, veth_name(self.cfg.network.bridge, row.name))
        log.info("removed %s, freed %s", row.name, row.ip)
        return {"name": row.name, "freed": [row.ip] if row.ip else []}

    # --- links --------------------------------------------------------------
    def _link_row(self, topo: Topology, e: Edge) -> dict:
        r = resolve_edge(topo, e)
        return {
            "link": model.link_text(e.alias, e.target, e.consumer),
            "consumer": e.consumer,
            "alias": e.alias,
            "target": e.target,
            "state": r.state,
            "address": r.address,
            "ports": [str(p) for p in r.ports],
        }

    def _consumer(self, args: dict) -> str:
        name = model.check_label(args.get("consumer"), "consumer name")
        if self.store.get(name) is None:
            raise ServiceError(f"no container named {name!r}: a link's consumer must be registered (see `tether ps`)")
        return name

    def _existing_link(self, consumer: str, alias: str) -> tuple:
        row = self.store.get_link(consumer, alias)
        if row is None:
            raise ServiceError(f"{consumer!r} has no link with alias {alias!r}: see `tether link ls`")
        return row

    async def link_add(self, args: dict) -> dict:
        async with self.lock:
            consumer = self._consumer(args)
            target = model.check_label(args.get("target"), "target name")
            alias = model.check_label(args.get("alias") or target, "alias")
            if (old := self.store.get_link(consumer, alias)) is not None:
                raise ServiceError(
                    f"{consumer!r} already has a link {alias!r} to {old[2]!r}: "
                    "use `tether link retarget` or another --alias"
                )
            async with self._change():
                self._add_link(consumer, alias, target)
            return self._link_row(self.topology(), Edge(*self.store.get_link(consumer, alias)))

    async def link_rm(self, args: dict) -> dict:
        async with self.lock:
            consumer = self._consumer(args)
            alias = model.check_label(args.get("alias"), "alias")
            row = self._existing_link(consumer, alias)
            async with self._change():
                self.store.delete_link(consumer, alias)
            await self._cut([["-d", row[3]]] if row[3] else [])
            return {"link": model.link_text(alias, row[2], consumer), "consumer": consumer, "alias": alias, "target": row[2]}

    async def link_retarget(self, args: dict) -> dict:
        async with self.lock:
            consumer = self._consumer(args)
            alias = model.check_label(args.get("alias"), "alias")
            target = model.check_label(args.get("target"), "target name")
            row = self._existing_link(consumer, alias)
            if target != row[2] and self.store.get(target) is None and not args.get("allow_dangling"):
                # a typo here would take the link's hosts line away: an outage
                raise ServiceError(
                    f"no container named {target!r}: check the name (`tether ps`), or pass --allow-dangling "
                    f"to point {consumer!r}'s {alias!r} at a name that registers later"
                )
            async with self._change():
                if target != row[2]:
                    self.store.set_link_target(consumer, alias, target, self._group(target))
            if target != row[2] and row[3]:
                await self._cut([["-d", row[3]]])
            out = self._link_row(self.topology(), Edge(*self.store.get_link(consumer, alias)))
            out["previous"] = row[2]
            out["firewall_commits"] = self.last_commits
            return out

    async def move(self, args: dict) -> dict:
        """Failover: every link to OLD now goes to NEW, and OLD's published
        host ports forward to NEW; one transaction, one firewall commit."""
        async with self.lock:
            old = model.check_label(args.get("old"), "container name")
            new = model.check_label(args.get("new"), "container name")
            if old == new:
                raise ServiceError(f"cannot move {old!r} onto itself: name two different containers")
            old_row = self.store.get(old)
            if old_row is None:
                raise ServiceError(f"no container named {old!r}: see `tether ps`")
            new_row = self.store.get(new)
            if new_row is None:
                raise ServiceError(f"no container named {new!r}: register it (start it) before moving to it")
            offered = set(new_row.expose) | {str(model.PortSpec(p.port, p.proto)) for p in model.parse_publish(",".join(new_row.publish))}
            ports = self.store.port_leases(old)
            missing = sorted({f"{port}/{proto}" for _, proto, _, port in ports} - offered)
            if missing:
                raise ServiceError(
                    f"{new!r} does not expose {', '.join(missing)}, which {old!r} publishes: "
                    f"start {new!r} with --expose {missing[0]}"
                )
            moved = [model.link_text(e.alias, new, e.consumer) for e in map(Edge._make, self.store.links()) if e.target == old]
            async with self._change():
                n_links = self.store.move_links(old, new)
                self.store.move_port_leases(old, new)
            if old_row.ip:
                # connections through any facade, or a host port, answered by OLD
                cuts = [["-d", self.cfg.network.facade_subnet, "-r", old_row.ip]] if n_links else []
                cuts += [["-p", proto, "--orig-port-dst", str(hp), "-r", old_row.ip] for hp, proto, _, _ in ports]
                await self._cut(cuts)
            return {
                "old": old,
                "new": new,
                "links": n_links,
                "moved": moved,
                "ports": [str(model.Published(hp, port, proto)) for hp, proto, _, port in ports],
                "firewall_commits": self.last_commits,
            }

    async def link_ls(self, args: dict) -> list[dict]:
        async with self.lock:
            topo = self.topology()
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
        async with self.lock:
            rows = [
                {"name": r.name, "id": r.id, "state": r.state, "runtime": r.runtime}
                for r in self.store.containers()
            ]
        cmds = {tuple(r["runtime"]) for r in rows if r["runtime"]}
        runc = shutil.which("runc")
        if runc and os.path.isdir(drift.RUNTIMES["runc"]):  # where runc and podman's runc keep theirs
            cmds.add((os.path.realpath(runc), "--root", drift.RUNTIMES["runc"]))
        listings = {}
        for cmd in sorted(cmds):
            with trio.move_on_after(5):
                p = await trio.run_process([*cmd, "list", "--format", "json"], capture_stdout=True, capture_stderr=True, check=False)
                if p.returncode == 0:
                    try:
                        listings[cmd] = drift.parse_listing(p.stdout.decode(errors="replace"))
                    except ValueError:
                        log.warning("drift: %s list printed no JSON", cmd[0])

        def ours(seen: drift.Seen) -> bool:
            try:
                with open(os.path.join(seen.bundle, "config.json"), "rb") as f:
                    spec = json.loads(f.read(16 << 20))
            except (OSError, ValueError, RecursionError):
                return True
            source = str(self.cfg.source) if self.cfg.source else None
            return isinstance(spec, dict) and drift.claims(spec, source, config_mod.DEFAULT_PATH)

        return [dataclasses.asdict(d) for d in drift.compare(rows, listings, ours)]

    OPS = (
        "register", "abort", "poststop", "ps", "inspect", "leases", "rm", "reconcile", "health", "drift",
        "link_add", "link_rm", "link_retarget", "link_ls", "move",
    )

    async def dispatch(self, op: str, args: dict):
        if op not in self.OPS:
            raise InputError(f"unknown operation {op[:40]!r}: upgrade the tether client to match the daemon")
        if op == "reconcile":
            return await self.reconcile()
        return await getattr(self, op)(args)
