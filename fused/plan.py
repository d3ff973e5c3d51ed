"""Pure: from one store snapshot and a request, the change to commit.

Every request is planned on a `Draft` (a snapshot with changes on top,
store/base.py): the functions here read it, write the leases, links and
containers the request changes into it, and return what the service needs
to touch the kernel. The service then commits `draft.change` and applies the
kernel steps; nothing here does I/O. What would need I/O is passed in as a
predicate: `alive(container)` (is its process still the one that
registered?) and `port_busy(port, proto)` (does a host process hold it?).

The allocation rules are DESIGN's "Leases": sticky first, then free, then
the least recently stopped; never a running holder's, where a holder whose
process is gone counts as stopped.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

from . import allocator, model, rules
from .allocator import Holder
from .errors import ServiceError
from .graph import Node, Shape, Topology
from .model import Container, IpLease, Link, PortLease
from .store.base import Draft, StoreSnapshot

if TYPE_CHECKING:
    from .config import NetworkConfig

MAX_BUSY_SKIPS = 256

Alive = Callable[[Container], bool]
PortBusy = Callable[[int, str], bool]


def stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


# --- views of a snapshot ----------------------------------------------------------
def _node(snap: StoreSnapshot, name: str) -> Node:
    c = snap.containers[name]
    lease = snap.ip_leases.get(name)
    return Node(name, lease.ip if lease else None, c.running, model.exposed(c.expose), c.answers)


def topology(snap: StoreSnapshot, strategy: str) -> Topology:
    nodes = {name: _node(snap, name) for name in snap.containers}
    edges = tuple(sorted(snap.links.values()))
    return Topology(nodes, edges, strategy, snap.groups, Shape(edges))


def changed_names(old: StoreSnapshot, new: StoreSnapshot) -> set[str]:
    """The containers whose record, address or outgoing links differ (the
    untouched records of a snapshot after a commit are the same objects:
    identity says it). A group's new target is not here: the topologies'
    groups say it (graph.affected)."""
    out = set()
    for table in ("containers", "ip_leases"):
        a, b = getattr(old, table), getattr(new, table)
        if a is b:
            continue
        out.update(k for k in a.keys() | b.keys() if a.get(k) is not b.get(k))
    if old.links is not new.links:
        out.update(k[0] for k in old.links.keys() | new.links.keys() if old.links.get(k) is not new.links.get(k))
    return out


def delta_names(old: StoreSnapshot, new: StoreSnapshot) -> set[str]:
    """`changed_names`, from the change set `new` was made with when it was
    made from the snapshot at `old`'s revision (a commit nobody else raced):
    a few names, however many records. Same revision, same records."""
    if new.delta is not None and new.delta[0] == old.revision:
        ch = new.delta[1]
        return set(ch.containers) | set(ch.ip_leases) | {k[0] for k in ch.links}
    return changed_names(old, new)


def update_topology(prev: Topology, old: StoreSnapshot, new: StoreSnapshot, names: set[str]) -> Topology:
    """`topology(new)` from `prev` (that of `old`), rebuilding only `names`'
    nodes, and the edges only when a link changed (a move changes groups)."""
    if old.containers is new.containers and old.ip_leases is new.ip_leases:
        nodes = prev.nodes
    else:
        nodes = dict(prev.nodes)
        for name in names:
            if name in new.containers:
                nodes[name] = _node(new, name)
            else:
                nodes.pop(name, None)
    if old.links is new.links:
        return Topology(nodes, prev.edges, prev.strategy, new.groups, prev.shape)
    edges = tuple(sorted(new.links.values()))
    return Topology(nodes, edges, prev.strategy, new.groups, Shape(edges))


def forwards(snap: StoreSnapshot, host: str = "") -> list[rules.PortForward]:
    """The host ports to forward: those of running containers (on `host`
    only, with several hosts: a host port forwards where its container runs)."""
    out = []
    for lease in snap.port_leases.values():
        c = snap.containers.get(lease.name)
        ip = snap.ip_leases.get(lease.name)
        if c is not None and c.running and ip is not None and (not host or c.host == host):
            out.append(rules.PortForward(lease.host_port, lease.proto, ip.ip, lease.port))
    return out


# --- registration -------------------------------------------------------------------
@dataclass(frozen=True)
class Registered:
    name: str
    ip: str
    mac: str
    same_start: bool = False  # this very start was registered already (prestart + createRuntime, a retry)
    fresh: bool = False  # the name had no record before
    evicted: tuple[str, ...] = ()
    dead: tuple[str, ...] = ()  # holders found dead on the way (marked stopped): their veths go


def register(
    d: Draft,
    reg: model.Registration,
    ino: int,
    runtime: tuple[str, ...],
    net: NetworkConfig,
    now: float,
    alive: Alive,
    port_busy: PortBusy,
    host: str = "",
) -> Registered:
    """`host`: the host it starts on (several hosts), "" on one."""
    d.host = host
    row = d.container(reg.name)
    if row is not None and row.running:
        lease = d.ip_lease(reg.name)
        if row.pid == reg.pid and row.netns_ino == ino and lease is not None:
            return Registered(reg.name, lease.ip, lease.mac, same_start=True)
        if alive(row):
            raise ServiceError(
                f"name {reg.name!r} is already used by running container {row.id!r}: "
                f"stop it first or choose another {model.ANN_NAME}"
            )
    evicted: list[str] = []
    ip = lease_address(d, reg.name, net, now, alive, evicted)
    mac = model.mac_for(ip)
    d.put(Container(
        reg.name, reg.id, model.RUNNING, reg.pid, ino, reg.bundle,
        row.created_at if row else now, now, None, "",
        tuple(str(p) for p in reg.expose), tuple(str(p) for p in reg.publish), tuple(runtime),
        row.answers if row else (), host,
    ))
    lease = d.ip_lease(reg.name)  # a lease kept is the same lease: its `since` stays
    if lease is not None and lease.ip != ip:
        if (by := d.answered().get(lease.ip)) is not None:
            d.update(reg.name, note=f"its address {lease.ip} is answered by {by} since a move: it got {ip} at {stamp(now)}")
    d.put_ip_lease(IpLease(ip, reg.name, mac, lease.since if lease is not None and lease.ip == ip else now))
    lease_ports(d, reg.name, reg.publish, net, now, alive, port_busy, evicted, row.publish if row else ())
    for link in reg.links:
        # links changed at run time (retarget) win over the annotation
        if d.link(reg.name, link.alias) is None:
            add_link(d, reg.name, link.alias, link.target, net)
    dead = tuple(
        n for n, c in d.change.containers.items()
        if n != reg.name and c is not None and not c.running and (old := d.snap.containers.get(n)) is not None and old.running
    )
    return Registered(reg.name, ip, mac, fresh=row is None, evicted=tuple(evicted), dead=dead)


class _Holders(Mapping):
    """address -> who holds it, built per address asked: the allocator asks
    about one or a few (the sticky one, the first free), and a Holder for
    each of 1000 leases cost more than the rest of a registration. With
    `alive`, a running holder whose process is gone counts as stopped (its
    poststop never came)."""

    def __init__(self, d: Draft, alive: Alive | None) -> None:
        self._d, self._alive = d, alive
        self._names = {lease.ip: lease.name for lease in d.ip_leases()}
        # an address a container answers at for another (a move) is its
        # until the move is undone or it is removed: never evicted
        self._answered = d.answered()
        self._names.update(self._answered)

    def __getitem__(self, ip: str) -> Holder:
        name = self._names[ip]
        if ip in self._answered:
            return Holder(name, True, None)
        c = self._d.container(name)
        return Holder(name, c.running and (self._alive is None or self._alive(c)), c.stopped_at)

    def __contains__(self, ip: object) -> bool:
        return ip in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _holders(d: Draft, alive: Alive | None) -> Mapping[str, Holder]:
    return _Holders(d, alive)


def _mark_dead_stopped(d: Draft, alive: Alive, now: float) -> list[str]:
    """`stop_dead` on the way to an allocation: a container of another host
    (its host is gone) keeps its pid, to run again when that host is back."""
    return stop_dead(d, alive, now, d.host)


def lease_address(d: Draft, name: str, net: NetworkConfig, now: float, alive: Alive, evicted: list[str]) -> str:
    current = d.ip_lease(name)
    pool = allocator.address_pool(net.network)
    try:
        choice = allocator.choose(pool, _holders(d, None), name, current.ip if current else None)
    except allocator.Exhausted:
        # the pool looks full: holders whose process died without a poststop are stopped
        if not _mark_dead_stopped(d, alive, now):
            raise ServiceError(
                f"address pool exhausted: every address of {net.network} is held by a running container; "
                "stop one, or enlarge network.subnet in the config"
            ) from None
        return lease_address(d, name, net, now, alive, evicted)
    if choice.evict:
        d.drop_ip_lease(choice.evict)
        d.update(choice.evict, note=(
            f"evicted: address {choice.key} given to {name} at {stamp(now)}; it gets a new address on its next start"
        ))
        evicted.append(choice.evict)
    return choice.key


def _port_holders(d: Draft, proto: str) -> dict[int, Holder]:
    held = {}
    for lease in d.port_leases():
        if lease.proto != proto:
            continue
        c = d.container(lease.name)
        held[lease.host_port] = Holder(lease.name, c.running, c.stopped_at)
    return held


def lease_ports(
    d: Draft,
    name: str,
    publish: list[model.PublishSpec],
    net: NetworkConfig,
    now: float,
    alive: Alive,
    port_busy: PortBusy,
    evicted: list[str],
    previous: tuple[str, ...] = (),
) -> None:
    """Sticky host ports per (name, port, proto): explicit ones claimed (taken
    over from a stopped holder), others chosen like addresses; a port a host
    process holds is never taken. A port the container published at its last
    start (`previous`) and publishes no more is freed; one a move gave it
    (never in its own --publish) stays."""
    wanted = {(spec.port, spec.proto) for spec in publish}
    dropped = {(p.port, p.proto) for p in model.parse_publish(",".join(previous))} - wanted
    for lease in d.port_leases(name):
        if (lease.port, lease.proto) in dropped:
            d.drop_port_lease(lease.host_port, lease.proto)
    for spec in publish:
        mine = [l.host_port for l in d.port_leases(name) if (l.port, l.proto) == (spec.port, spec.proto)]
        if spec.host_port is None and mine:
            if not port_busy(mine[0], spec.proto):
                continue
            # a host process took the sticky port while the container was
            # stopped: never taken over, so the container gets another one
            d.drop_port_lease(mine[0], spec.proto)
            d.update(name, note=(
                f"host port {mine[0]}/{spec.proto} was taken by a host process while {name} "
                f"was stopped: it got another at {stamp(now)}"
            ))
            mine = []
        if spec.host_port is not None and spec.host_port in mine and not port_busy(spec.host_port, spec.proto):
            continue
        if spec.host_port is not None and port_busy(spec.host_port, spec.proto):
            raise ServiceError(
                f"host port {spec.host_port}/{spec.proto}: listen {spec.proto} 0.0.0.0:{spec.host_port}: bind: "
                "address already in use (a host process holds it): publish another host port, "
                "or leave the host port out for a free one"
            )
        held = _port_holders(d, spec.proto)
        try:
            if spec.host_port is not None:
                holder = held.get(spec.host_port)
                if holder is not None and holder.running and holder.name != name:
                    c = d.container(holder.name)
                    if c is not None and not alive(c):  # its poststop never came
                        d.put(_stopped(c, now))
                        held = _port_holders(d, spec.proto)
                choice = allocator.claim(spec.host_port, held, name)
            else:
                try:
                    choice = allocator.choose(net.ports, held, name)
                except allocator.Exhausted:
                    if not _mark_dead_stopped(d, alive, now):  # holders whose poststop never came
                        raise
                    held = _port_holders(d, spec.proto)
                    choice = allocator.choose(net.ports, held, name)
                for _ in range(MAX_BUSY_SKIPS):  # a port a host process uses is skipped like a running holder's
                    if not port_busy(choice.key, spec.proto):
                        break
                    held[choice.key] = Holder("(a host process)", True, None)
                    choice = allocator.choose(net.ports, held, name)
        except allocator.HeldByRunning as e:
            raise ServiceError(
                f"host port {spec.host_port}/{spec.proto} is held by running container {e.holder!r}: "
                "stop it, publish another host port, or leave the host port out for a free one"
            ) from None
        except allocator.Exhausted:
            raise ServiceError(
                f"host port pool exhausted: every {spec.proto} port of {net.port_range} is held "
                "by a running container; stop one, or enlarge network.port_range"
            ) from None
        if choice.evict:
            d.update(choice.evict, note=f"evicted: host port {choice.key}/{spec.proto} given to {name} at {stamp(now)}")
            evicted.append(choice.evict)
        if spec.host_port is not None:
            for hp in mine:  # the spec changed from an automatic port to this one
                d.drop_port_lease(hp, spec.proto)
        d.put_port_lease(PortLease(choice.key, spec.proto, name, spec.port, now))


# --- links ---------------------------------------------------------------------------
def facade(d: Draft, net: NetworkConfig) -> str | None:
    if net.strategy != "facade":
        return None
    used = {l.facade for l in d.links() if l.facade}
    pool = net.facade_network
    first, last = int(pool.network_address) + 1, int(pool.broadcast_address) - 1  # no gateway here: from .1
    for i in range(first, last + 1):
        if (ip := allocator.dotted(i)) not in used:
            return ip
    raise ServiceError(
        f"facade pool exhausted: every address of {net.facade_subnet} belongs to a link; "
        "remove links or enlarge network.facade_subnet"
    )


def group(d: Draft, target: str) -> str:
    """A link group for a link to `target`: one that goes to it, or a new one."""
    groups = d.groups()
    n = 0
    while True:
        g = target if n == 0 else f"{target}#{n}"
        if groups.get(g, target) == target:
            return g
        n += 1


def add_link(d: Draft, consumer: str, alias: str, target: str, net: NetworkConfig) -> Link:
    link = Link(consumer, alias, facade(d, net), join_group(d, target))
    d.put_link(link)
    return link


def join_group(d: Draft, target: str) -> str:
    """The group a new link to `target` joins, recorded if new."""
    g = group(d, target)
    if d.group_target(g) is None:
        d.put_group(g, target)
    return g


def existing_link(d: Draft, consumer: str, alias: str) -> Link:
    link = d.link(consumer, alias)
    if link is None:
        raise ServiceError(f"{consumer!r} has no link with alias {alias!r}: see `tether link ls`")
    return link


def consumer(d: Draft, name: str) -> Container:
    c = d.container(name)
    if c is None:
        raise ServiceError(f"no container named {name!r}: a link's consumer must be registered (see `tether ps`)")
    return c


def link_add(d: Draft, consumer_name: str, target: str, alias: str, net: NetworkConfig) -> Link:
    consumer(d, consumer_name)
    if (old := d.link(consumer_name, alias)) is not None:
        raise ServiceError(
            f"{consumer_name!r} already has a link {alias!r} to {d.target(old)!r}: "
            "use `tether link retarget` or another --alias"
        )
    return add_link(d, consumer_name, alias, target, net)


def link_retarget(d: Draft, consumer_name: str, alias: str, target: str, allow_dangling: bool) -> tuple[Link, str, Link]:
    """(the link, the target it had, the link now)."""
    consumer(d, consumer_name)
    old = existing_link(d, consumer_name, alias)
    before = d.target(old)
    if target != before and d.container(target) is None and not allow_dangling:
        # a typo here would take the link's hosts line away: an outage
        raise ServiceError(
            f"no container named {target!r}: check the name (`tether ps`), or pass --allow-dangling "
            f"to point {consumer_name!r}'s {alias!r} at a name that registers later"
        )
    if target != before:
        d.put_link(old._replace(group=join_group(d, target)))
    return old, before, d.link(consumer_name, alias)


class Handover(NamedTuple):
    """An address that now answers elsewhere (strategies veth-move, reassign)."""

    ip: str
    mac: str
    giver: str  # the container that answered at it
    taker: str  # the one that answers now
    home: bool  # it is the taker's own address (an undo)


@dataclass(frozen=True)
class Moved:
    links: tuple[Link, ...]  # the links that go to NEW now, and no more to OLD
    ports: tuple[PortLease, ...]  # OLD's, before the move
    addresses: tuple[Handover, ...] = ()


HANDING = ("veth-move", "reassign")  # the strategies that move addresses


def move(d: Draft, old: str, new: str, strategy: str = "facade", alive: Alive | None = None,
         now: float = 0.0) -> Moved:
    """Failover: every link to OLD now goes to NEW (each of OLD's groups
    does: one record and one firewall rule per group), and OLD's published
    host ports forward to NEW. With veth-move or reassign, NEW also answers
    at OLD's address (and those OLD answered
    at for others), or, when NEW answers at OLD's (an undo), NEW's own address
    comes back."""
    if old == new:
        raise ServiceError(f"cannot move {old!r} onto itself: name two different containers")
    old_row = d.container(old)
    if old_row is None:
        raise ServiceError(f"no container named {old!r}: see `tether ps`")
    new_row = d.container(new)
    if new_row is None:
        raise ServiceError(f"no container named {new!r}: register it (start it) before moving to it")
    if strategy in HANDING and not (new_row.running and (alive is None or alive(new_row))):
        raise ServiceError(
            f"{new!r} is not running, and with strategy {strategy} it takes over {old!r}'s address "
            f"in its own network namespace: start {new!r} first"
        )
    offered = set(new_row.expose) | {str(model.PortSpec(p.port, p.proto)) for p in model.parse_publish(",".join(new_row.publish))}
    ports = tuple(d.port_leases(old))
    missing = sorted({f"{l.port}/{l.proto}" for l in ports} - offered)
    if missing:
        raise ServiceError(
            f"{new!r} does not expose {', '.join(missing)}, which {old!r} publishes: "
            f"start {new!r} with --expose {missing[0]}"
        )
    # one record per group: its links (a thousand at a move) stay as they are
    groups = {g for g, t in d.groups().items() if t == old}
    for g in groups:
        d.put_group(g, new)
    moved = [l for l in d.links() if l.group in groups] if groups else []
    for lease in ports:
        d.put_port_lease(PortLease(lease.host_port, lease.proto, new, lease.port, lease.since))
    handed = _hand_addresses(d, old_row, new_row, strategy, now) if strategy in HANDING else ()
    return Moved(tuple(moved), ports, handed)


def _hand_addresses(d: Draft, old_row: Container, new_row: Container, strategy: str, now: float) -> tuple[Handover, ...]:
    old, new = old_row.name, new_row.name
    own_new = d.ip_lease(new)
    if own_new is not None and own_new.ip in old_row.answers:
        give = [own_new.ip]  # an undo: NEW's own address comes home
    else:
        own_old = d.ip_lease(old)
        lent = own_old is not None and own_old.ip in d.answered()
        give = ([own_old.ip] if own_old is not None and not lent else []) + list(old_row.answers)
    if not give:
        return ()
    home = {own_new.ip} if own_new is not None else set()
    d.update(old, answers=tuple(a for a in old_row.answers if a not in give), note=(
        f"{', '.join(give)} answered by {new} since a move ({strategy}) at {stamp(now)}"
        if any(a not in home for a in give) else old_row.note))
    d.update(new, answers=tuple(dict.fromkeys([*new_row.answers, *(a for a in give if a not in home)])),
             note=f"{own_new.ip} answered by {new} again (the move undone) at {stamp(now)}" if home & set(give) else new_row.note)
    return tuple(Handover(ip, model.mac_for(ip), old, new, ip in home) for ip in give)


# --- stops and removals -----------------------------------------------------------------
def _stopped(c: Container, now: float) -> Container:
    return Container(
        c.name, c.id, model.STOPPED, None, None, c.bundle, c.created_at, c.started_at, now, c.note,
        c.expose, c.publish, c.runtime, c.answers, c.host,
    )


def stop(d: Draft, name: str, now: float) -> Container:
    return d.put(_stopped(d.container(name), now))


def stop_dead(d: Draft, alive: Alive, now: float, host: str = "", limit: int | None = None) -> list[str]:
    """Mark stopped every running container whose process is gone. With
    several hosts (`host`: this one), a container of a host that is gone
    keeps its pid and netns in its record: if that host comes back with it
    still running (its daemon was away longer than its lease), it is running
    again (`revive`). `limit`: at most that many (one etcd transaction's worth)."""
    dead = [c for c in d.containers() if c.running and not alive(c)][:limit]
    for c in dead:
        if host and c.host and c.host != host:
            d.put(replace(c, state=model.STOPPED, stopped_at=now,
                          note=f"stopped: its host {c.host} was gone (its etcd lease expired) at {stamp(now)}"))
        else:
            d.put(_stopped(c, now))
    return [c.name for c in dead]


def revive(d: Draft, alive: Alive, host: str, now: float) -> list[str]:
    """This host's containers that another host marked stopped while this
    one was away (`stop_dead`), whose process still runs here with its
    address: running again, as they are."""
    back = []
    for c in d.containers():
        if c.running or c.host != host or not c.pid:
            continue
        if c.netns_ino is not None and alive(replace(c, state=model.RUNNING)) and d.ip_lease(c.name) is not None:
            d.put(replace(c, state=model.RUNNING, stopped_at=None,
                          note=f"running again at {stamp(now)}: its host was away longer than its etcd lease"))
            back.append(c.name)
        else:  # it died meanwhile: stopped as by its poststop, never looked at again
            d.put(_stopped(c, c.stopped_at or now))
    return back


def remove(d: Draft, name: str, now: float = 0.0) -> Container:
    c = d.container(name)
    for lease in d.ip_leases():  # the addresses it answered at go back to their owners
        if lease.ip in c.answers and lease.name != name:
            d.update(lease.name, note=f"{lease.ip} answered by {lease.name} again ({name} removed at {stamp(now)})")
    d.delete(name)
    return c


def lease_rows(snap: StoreSnapshot) -> list[dict]:
    """Address and port leases with their holder's state, by kind then name."""
    rows = []
    for lease in snap.ip_leases.values():
        c = snap.containers[lease.name]
        rows.append({"kind": "ip", "lease": lease.ip, "maps": None, "name": lease.name, "state": c.state,
                     "stopped_at": c.stopped_at, "since": lease.since})
    for lease in snap.port_leases.values():
        c = snap.containers[lease.name]
        rows.append({"kind": "port", "lease": str(lease.host_port), "maps": f"{lease.proto}:{lease.port}",
                     "name": lease.name, "state": c.state, "stopped_at": c.stopped_at, "since": lease.since})
    return sorted(rows, key=lambda r: (r["kind"], r["name"]))
