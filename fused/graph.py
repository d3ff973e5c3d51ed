"""Pure: the link graph and what each consumer sees through it.

A `Topology` is a plain snapshot of the store (containers and links); `resolve`
turns it into per-consumer views. No I/O here.
"""
from __future__ import annotations

from typing import NamedTuple

from .model import PortSpec

# NamedTuples, not dataclasses: a move at 1000 links builds thousands of them


class Node(NamedTuple):
    name: str
    ip: str | None  # None: no address lease (evicted)
    running: bool
    expose: tuple[PortSpec, ...] = ()
    answers: tuple[str, ...] = ()  # others' addresses it answers at (a move: veth-move, reassign)


class Edge(NamedTuple):
    """A link: consumer --alias--> the target of its group (Topology.groups)."""

    consumer: str
    alias: str
    facade: str | None = None  # the link's stable address (strategy facade)
    group: str = ""  # links retargeted together by a move share a group


class Shape:
    """The edges, and what is looked up by them: each consumer's edges by
    alias, each group's consumers. One object while the edges stay (a move
    changes only its groups' targets), its indexes built once, when first
    asked."""

    __slots__ = ("edges", "_out", "_consumers")

    def __init__(self, edges: tuple[Edge, ...]) -> None:
        self.edges = edges
        self._out: dict[str, list[Edge]] | None = None
        self._consumers: dict[str, set[str]] | None = None

    def out(self, name: str) -> list[Edge]:
        """`name`'s edges, by alias (the caller does not change the list)."""
        if self._out is None:
            out: dict[str, list[Edge]] = {}
            for e in self.edges:
                out.setdefault(e.consumer, []).append(e)
            for es in out.values():
                es.sort(key=_alias)
            self._out = out
        return self._out.get(name, [])

    def consumers(self, groups) -> set[str]:
        """Whoever has a link in one of `groups`."""
        if self._consumers is None:
            by: dict[str, set[str]] = {}
            for e in self.edges:
                by.setdefault(e.group, set()).add(e.consumer)
            self._consumers = by
        out: set[str] = set()
        for g in groups:
            out |= self._consumers.get(g, set())
        return out


class Topology(NamedTuple):
    nodes: dict[str, Node] = {}
    edges: tuple[Edge, ...] = ()
    strategy: str = "direct"
    groups: dict[str, str] = {}  # link group -> the name its links go to
    # the same object while the edges stay (a move changes only `groups`):
    # what depends on the edges alone, the firewall's link jumps and the
    # lookups by consumer and group, is computed once for it (None: never
    # cached)
    shape: Shape | None = None

    @classmethod
    def of(cls, nodes: dict[str, Node], links, strategy: str = "direct") -> Topology:
        """From (consumer, alias, target[, facade[, group]]) tuples, a group
        being the target's name when not given: tests and tools write links
        that way."""
        edges, groups = [], {}
        for consumer, alias, target, *rest in links:
            facade = rest[0] if rest else None
            group = rest[1] if len(rest) > 1 else target
            if groups.setdefault(group, target) != target:
                raise ValueError(f"group {group!r} goes to {groups[group]!r}, not {target!r}")
            edges.append(Edge(consumer, alias, facade, group))
        edges_ = tuple(sorted(edges))
        return cls(nodes, edges_, strategy, groups, Shape(edges_))

    def index(self) -> Shape:
        return self.shape if self.shape is not None else Shape(self.edges)


class Resolved(NamedTuple):
    """A link as its consumer sees it; address None: dangling (no line)."""

    alias: str
    target: str
    address: str | None
    ports: tuple[PortSpec, ...]
    state: str  # "running" | "stopped" | "dangling"


class View(NamedTuple):
    name: str
    ip: str | None
    links: tuple[Resolved, ...]  # sorted by alias


_make = tuple.__new__  # a NamedTuple without its keyword-parsing __new__: a move resolves thousands


def resolve_edge(topo: Topology, e: Edge) -> Resolved:
    target = topo.groups.get(e.group, "")
    t = topo.nodes.get(target)
    if t is None:
        return _make(Resolved, (e.alias, target, None, (), "dangling"))
    if topo.strategy == "facade":
        address = e.facade if t.ip else None
    else:
        address = t.ip
    state = ("running" if t.running else "stopped") if address else "dangling"
    return _make(Resolved, (e.alias, target, address, t.expose, state))


def views(topo: Topology) -> dict[str, View]:
    shape = topo.index()
    return {name: view(topo, name, shape.out(name)) for name in topo.nodes}


def view(topo: Topology, name: str, out_links: list[Edge]) -> View:
    """`name`'s view; `out_links` its edges, by alias."""
    node = topo.nodes[name]
    return View(name, node.ip, tuple([resolve_edge(topo, e) for e in out_links]))


def _alias(e: Edge) -> str:
    return e.alias


def changed_groups(old: Topology, new: Topology) -> set[str]:
    a, b = old.groups, new.groups
    if a is b:
        return set()
    return {g for g in a.keys() | b.keys() if a.get(g) != b.get(g)}


def affected(old: Topology, new: Topology, touched: set[str]) -> set[str]:
    """The names whose views may differ between `old` and `new` when the
    records of `touched` changed (their node, or their outgoing links): they
    themselves, every consumer with a link to one of them, before or after,
    and every consumer in a group whose target changed."""
    out = set(touched)
    moved = changed_groups(old, new)
    for topo in (old, new):
        groups = moved | {g for g, t in topo.groups.items() if t in touched}
        if groups:
            out |= topo.index().consumers(groups)
    return out


def update_views(prev: dict[str, View], topo: Topology, names: set[str]) -> dict[str, View]:
    """`views(topo)`, computed only for `names`: every other view is the
    previous one, the very same object."""
    shape = topo.index()
    views_ = dict(prev)
    for name in names:
        if name in topo.nodes:
            views_[name] = view(topo, name, shape.out(name))
        else:
            views_.pop(name, None)
    return views_
