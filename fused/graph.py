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
    consumer: str
    alias: str
    target: str
    facade: str | None = None  # the link's stable address (strategy facade)
    group: str = ""  # links retargeted together by a move share a group


class Topology(NamedTuple):
    nodes: dict[str, Node] = {}
    edges: tuple[Edge, ...] = ()
    strategy: str = "direct"
    # the same object while every edge keeps its consumer, alias, facade and
    # group (a move changes only targets): what depends on those alone, the
    # firewall's link jumps, is computed once for it (None: never cached)
    shape: object = None


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
    t = topo.nodes.get(e.target)
    if t is None:
        return _make(Resolved, (e.alias, e.target, None, (), "dangling"))
    if topo.strategy == "facade":
        address = e.facade if t.ip else None
    else:
        address = t.ip
    state = ("running" if t.running else "stopped") if address else "dangling"
    return _make(Resolved, (e.alias, e.target, address, t.expose, state))


def views(topo: Topology) -> dict[str, View]:
    out_links: dict[str, list[Edge]] = {}
    for e in topo.edges:
        out_links.setdefault(e.consumer, []).append(e)
    return {name: view(topo, name, out_links.get(name, [])) for name in topo.nodes}


def view(topo: Topology, name: str, out_links: list[Edge]) -> View:
    """`name`'s view; `out_links` (its edges, a list of the caller's) is sorted in place."""
    node = topo.nodes[name]
    out_links.sort(key=_alias)
    return View(name, node.ip, tuple([resolve_edge(topo, e) for e in out_links]))


def _alias(e: Edge) -> str:
    return e.alias


def affected(old: Topology, new: Topology, touched: set[str]) -> set[str]:
    """The names whose views may differ between `old` and `new` when the
    records of `touched` changed (their node, or their outgoing links): they
    themselves, and every consumer with a link to one of them, before or after."""
    out = set(touched)
    for edges in (old.edges, new.edges):
        out.update(e.consumer for e in edges if e.target in touched)
    return out


def update_views(prev: dict[str, View], topo: Topology, names: set[str]) -> dict[str, View]:
    """`views(topo)`, computed only for `names`: every other view is the
    previous one, the very same object."""
    out_links: dict[str, list[Edge]] = {}
    for e in topo.edges:
        if e.consumer in names:
            out_links.setdefault(e.consumer, []).append(e)
    views_ = dict(prev)
    for name in names:
        if name in topo.nodes:
            views_[name] = view(topo, name, out_links.get(name, []))
        else:
            views_.pop(name, None)
    return views_
