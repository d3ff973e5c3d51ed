"""The Store protocol: one snapshot read, one conditional write of a change set.

    snap = store.snapshot()                  # everything, at one revision
    draft = Draft(snap)                      # plan reads and writes here (pure)
    ...
    store.commit(draft.change, snap.revision)   # all or nothing; Conflict if
                                                # someone committed since

This is the shape an etcd backend needs too (a read at a revision, then a
transaction conditioned on it), and what the in-memory twin (memory.py)
implements for unit tests. Records are model's: Container, IpLease,
PortLease, Link; and each link group's target (a name), which a move
rewrites: one record per group, however many links it holds. Pure: no I/O
here.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..errors import StoreError
from ..model import Container, IpLease, Link, PortLease

__all__ = ["ChangeSet", "Conflict", "Draft", "Store", "StoreError", "StoreSnapshot", "apply", "inverse"]

PortKey = tuple[int, str]  # (host_port, proto)
LinkKey = tuple[str, str]  # (consumer, alias)


class Conflict(StoreError):
    """The store changed since the snapshot the change was planned on."""


@dataclass(frozen=True)
class StoreSnapshot:
    """Every record at one revision. Treat the dicts as read-only."""

    revision: int = 0
    containers: dict[str, Container] = field(default_factory=dict)
    ip_leases: dict[str, IpLease] = field(default_factory=dict)  # by container name
    port_leases: dict[PortKey, PortLease] = field(default_factory=dict)
    links: dict[LinkKey, Link] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # link group -> its target
    # (revision, change): this snapshot is the one at `revision` with `change`
    # applied (None: read whole). Whoever holds the snapshot at that revision
    # knows what differs without comparing every record.
    delta: tuple[int, ChangeSet] | None = field(default=None, compare=False, repr=False)


@dataclass
class ChangeSet:
    """Records to write (a value) or delete (None), by key."""

    containers: dict[str, Container | None] = field(default_factory=dict)
    ip_leases: dict[str, IpLease | None] = field(default_factory=dict)
    port_leases: dict[PortKey, PortLease | None] = field(default_factory=dict)
    links: dict[LinkKey, Link | None] = field(default_factory=dict)
    groups: dict[str, str | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.containers or self.ip_leases or self.port_leases or self.links or self.groups)

    def names(self) -> set[str]:
        """The containers whose records (or leases, or outgoing links) change."""
        return (
            set(self.containers) | set(self.ip_leases)
            | {k[0] for k in self.links}
            | {v.name for v in self.port_leases.values() if v is not None}
        )


def _merged(base: dict, changes: dict) -> dict:
    if not changes:
        return base
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def apply(snap: StoreSnapshot, change: ChangeSet, revision: int | None = None) -> StoreSnapshot:
    """The snapshot with `change` applied (untouched dicts are shared)."""
    return StoreSnapshot(
        snap.revision + 1 if revision is None else revision,
        _merged(snap.containers, change.containers),
        _merged(snap.ip_leases, change.ip_leases),
        _merged(snap.port_leases, change.port_leases),
        _merged(snap.links, change.links),
        _merged(snap.groups, change.groups),
        (snap.revision, change),
    )


def inverse(snap: StoreSnapshot, change: ChangeSet) -> ChangeSet:
    """The change set that undoes `change` when applied right after it:
    every key it touches back to its value in `snap` (None: absent)."""
    return ChangeSet(
        {k: snap.containers.get(k) for k in change.containers},
        {k: snap.ip_leases.get(k) for k in change.ip_leases},
        {k: snap.port_leases.get(k) for k in change.port_leases},
        {k: snap.links.get(k) for k in change.links},
        {k: snap.groups.get(k) for k in change.groups},
    )


class Store(Protocol):
    def snapshot(self) -> StoreSnapshot:
        """Everything, at the store's current revision."""

    def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        """Write `change` at once if the store is still at `revision`, else
        raise Conflict; returns the snapshot after it."""

    def close(self) -> None: ...


class Draft:
    """A snapshot with changes on top: what `plan` reads and writes. Every
    query sees the changes made so far; `change` is what to commit."""

    def __init__(self, snap: StoreSnapshot) -> None:
        self.snap = snap
        self._change = ChangeSet()
        self._left: set[str] = set()  # groups a link left: deleted once no link is in them
        self.host = ""  # the host planning, with several hosts (plan.register sets it)

    @property
    def change(self) -> ChangeSet:
        if self._left:  # one pass over the links for every group left, not one per link
            used = {l.group for l in self._all("links")}
            for g in self._left - used:
                if self.group_target(g) is not None:
                    self._change.groups[g] = None
            self._left = set()
        return self._change

    @change.setter
    def change(self, change: ChangeSet) -> None:
        self._change, self._left = change, set()

    def _get(self, table: str, key):
        changes = getattr(self._change, table)
        if key in changes:
            return changes[key]
        return getattr(self.snap, table).get(key)

    def _all(self, table: str) -> Iterable:
        changes = getattr(self._change, table)
        base = getattr(self.snap, table)
        if not changes:
            return base.values()
        return [v for v in _merged(base, changes).values()]

    def after(self) -> StoreSnapshot:
        return apply(self.snap, self.change)

    # --- containers ---------------------------------------------------------
    def container(self, name: str) -> Container | None:
        return self._get("containers", name)

    def containers(self) -> list[Container]:
        return sorted(self._all("containers"), key=lambda c: c.name)

    def put(self, c: Container) -> Container:
        self._change.containers[c.name] = c
        return c

    def update(self, name: str, **fields) -> Container:
        return self.put(replace(self.container(name), **fields))

    def delete(self, name: str) -> None:
        """The container and everything that is its own: leases, its links."""
        self._change.containers[name] = None
        self.drop_ip_lease(name)
        for lease in self.port_leases(name):
            self.drop_port_lease(lease.host_port, lease.proto)
        for link in self.links(name):
            self.delete_link(name, link.alias)

    def answered(self) -> dict[str, str]:
        """address -> the container that answers at it for another since a
        move (strategies veth-move, reassign)."""
        return {ip: c.name for c in self.containers() for ip in c.answers}

    def find_running_by_id(self, cid: str) -> Container | None:
        return next((c for c in self._all("containers") if c.id == cid and c.running), None)

    # --- addresses ------------------------------------------------------------
    def ip_lease(self, name: str) -> IpLease | None:
        return self._get("ip_leases", name)

    def ip_leases(self) -> list[IpLease]:
        return list(self._all("ip_leases"))

    def put_ip_lease(self, lease: IpLease) -> None:
        holder = next((l for l in self._all("ip_leases") if l.ip == lease.ip and l.name != lease.name), None)
        if holder is not None:
            raise StoreError(f"address {lease.ip} is leased to {holder.name!r}: evict it first")
        self._change.ip_leases[lease.name] = lease

    def drop_ip_lease(self, name: str) -> None:
        if self.ip_lease(name) is not None:
            self._change.ip_leases[name] = None

    # --- host ports -------------------------------------------------------------
    def port_leases(self, name: str | None = None) -> list[PortLease]:
        """By host port, then proto; only `name`'s when given."""
        return sorted(
            (l for l in self._all("port_leases") if name is None or l.name == name), key=lambda l: l.key
        )

    def put_port_lease(self, lease: PortLease) -> None:
        self._change.port_leases[lease.key] = lease

    def drop_port_lease(self, host_port: int, proto: str) -> None:
        if self._get("port_leases", (host_port, proto)) is not None:
            self._change.port_leases[(host_port, proto)] = None

    # --- links ---------------------------------------------------------------
    def link(self, consumer: str, alias: str) -> Link | None:
        return self._get("links", (consumer, alias))

    def links(self, consumer: str | None = None) -> list[Link]:
        """By consumer, then alias; only `consumer`'s when given."""
        return sorted(l for l in self._all("links") if consumer is None or l.consumer == consumer)

    def put_link(self, link: Link) -> None:
        """A link to its group's target: the group must have one (put_group)."""
        old = self.link(link.consumer, link.alias)
        self._change.links[(link.consumer, link.alias)] = link
        if old is not None and old.group != link.group:
            self._left.add(old.group)

    def delete_link(self, consumer: str, alias: str) -> None:
        if (old := self.link(consumer, alias)) is not None:
            self._change.links[(consumer, alias)] = None
            self._left.add(old.group)

    def target(self, link: Link) -> str:
        """The name `link` goes to: its group's target."""
        return self.group_target(link.group)

    def group_target(self, group: str) -> str | None:
        return self._get("groups", group)

    def groups(self) -> dict[str, str]:
        """link group -> target."""
        return _merged(self.snap.groups, self._change.groups)

    def put_group(self, group: str, target: str) -> None:
        self._change.groups[group] = target
        self._left.discard(group)
