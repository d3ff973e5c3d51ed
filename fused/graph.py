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


def resolve_edge(topo: Topology, e: Edge) -> Resolved:
    t = topo.nodes.get(e.target)
    if t is None:
        return Resolved(e.alias, e.target, None, (), "dangling")
    if topo.strategy == "facade":
        address = e.facade if t.ip else None
    else:
        address = t.ip
    state = ("running" if t.running else "stopped") if address else "dangling"
    return Resolved(e.alias, e.target, address, t.expose, state)


def views(topo: Topology) -> dict[str, View]:
    out_links: dict[str, list[Edge]] = {}
    for e in topo.edges:
        out_links.setdefault(e.consumer, []).append(e)
    return {
        name: View(
            name,
            node.ip,
            tuple(resolve_edge(topo, e) for e in sorted(out_links.get(name, []), key=lambda e: e.alias)),
        )
        for name, node in topo.nodes.items()
    }
