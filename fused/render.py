"""Pure: the bytes of each served file (DESIGN "Served files").

    hosts        127.0.0.1/::1 lines, own entry, one line per link (by alias)
    ports        ALIAS<TAB>PROTO<TAB>PORT<TAB>ADDRESS, sorted by alias, proto, port
    env          DOCKER_LINK_PORT_<ALIAS>=p1,p2 (ascending), one line per link
    resolv.conf  nameserver <gateway> when DNS is enabled
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

from .graph import Resolved, Topology, View, views

FILES = ("hosts", "ports", "env", "resolv.conf")

LOCALHOST = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def hosts(v: View | None) -> bytes:
    lines = [LOCALHOST]
    if v is not None:
        if v.ip:
            lines.append(f"{v.ip}\t{v.name}\n")
        for link in v.links:
            if link.address:
                names = link.alias if link.alias == link.target else f"{link.alias} {link.target}"
                lines.append(f"{link.address}\t{names}\n")
    return "".join(lines).encode()


def ports(v: View | None) -> bytes:
    if v is None:
        return b""
    rows = sorted(
        (link.alias, p.proto, p.port, link.address) for link in v.links if link.address for p in link.ports
    )
    return "".join(f"{a}\t{proto}\t{port}\t{addr}\n" for a, proto, port, addr in rows).encode()


def env_var(alias: str) -> str:
    return "DOCKER_LINK_PORT_" + alias.upper().replace("-", "_")


def env_value(ports_: tuple) -> str:
    return ",".join(str(p) for p in sorted({p.port for p in ports_}))


def env(v: View | None) -> bytes:
    if v is None:
        return b""
    return "".join(
        f"{env_var(link.alias)}={env_value(link.ports)}\n" for link in v.links if link.address
    ).encode()


def resolv(gateway: str, dns_enabled: bool, search: tuple[str, ...] = ()) -> bytes:
    if not dns_enabled:
        return b"# tether: DNS is disabled ([dns] enabled = false)\n"
    out = f"nameserver {gateway}\n"
    if search:
        out += "search " + " ".join(search) + "\n"
    return (out + "options ndots:0\n").encode()


@dataclass(frozen=True)
class FileSet:
    hosts: bytes
    ports: bytes
    env: bytes
    resolv: bytes

    def get(self, fname: str) -> bytes:
        return {"hosts": self.hosts, "ports": self.ports, "env": self.env, "resolv.conf": self.resolv}[fname]


@functools.lru_cache(maxsize=16384)
def fileset(v: View | None, resolv_bytes: bytes) -> FileSet:
    """Cached by view: a change re-renders only the containers it touches,
    and an unchanged container keeps the very same FileSet object."""
    return FileSet(hosts(v), ports(v), env(v), resolv_bytes)


def render_all(
    topo: Topology, gateway: str, dns_enabled: bool, search: tuple[str, ...] = (), views_: dict[str, View] | None = None
) -> tuple[dict[str, FileSet], FileSet]:
    """Files of every registered name, and those of any other valid name."""
    r = resolv(gateway, dns_enabled, search)
    vs = views_ if views_ is not None else views(topo)
    return {name: fileset(v, r) for name, v in vs.items()}, fileset(None, r)


def update_files(
    prev: dict[str, FileSet], views_: dict[str, View], names: set[str], resolv_bytes: bytes
) -> dict[str, FileSet]:
    """The files of `views_`, rendered only for `names`; every other name
    keeps its previous FileSet (the file server then sends nothing for it)."""
    files = dict(prev)
    for name in names:
        if name in views_:
            files[name] = fileset(views_[name], resolv_bytes)
        else:
            files.pop(name, None)
    return files


@dataclass(frozen=True)
class Snapshot:
    """What the filesystem serves: immutable, replaced whole on every change."""

    files: dict[str, FileSet] = field(default_factory=dict)
    default: FileSet = FileSet(b"", b"", b"", b"")
    mtime_ns: int = 0


def changed_files(old: Snapshot, new: Snapshot, names) -> list[tuple[str, str]]:
    """(name, file) pairs among `names` whose bytes differ between snapshots."""
    out = []
    for name in names:
        a = old.files.get(name, old.default)
        b = new.files.get(name, new.default)
        if a is b or a == b:
            continue
        for f in FILES:
            if a.get(f) != b.get(f):
                out.append((name, f))
    return out


class DnsData:
    """What the DNS responder answers from: immutable, replaced whole.

    names  every registered container with an address -> address
    links  a container's address -> its links by alias
    hosts  a container's address -> every name its hosts file gives, with
           the address of the first line naming it (what a hosts lookup returns)
    ptr    container address -> name; facade address -> alias (a facade
           belongs to one link). Derived on the first PTR query, not on
           every change.
    """

    __slots__ = ("names", "links", "hosts", "_ptr")

    def __init__(self, names: dict[str, str], links: dict[str, dict[str, Resolved]],
                 ptr: dict[str, str] | None = None, hosts: dict[str, dict[str, str]] | None = None) -> None:
        self.names = names
        self.links = links
        self.hosts = hosts if hosts is not None else {}
        self._ptr = ptr

    @property
    def ptr(self) -> dict[str, str]:
        if self._ptr is None:
            ptr = {ip: name for name, ip in self.names.items()}
            for by_alias in self.links.values():
                for link in by_alias.values():
                    ptr.setdefault(link.address, link.alias)
            self._ptr = ptr
        return self._ptr


def _dns_entries(v: View) -> tuple[dict[str, Resolved], dict[str, str]]:
    """A view's links by alias, and the names its hosts file gives: in the
    order of the file (localhost, own line, then links by alias; a container
    or an alias named localhost comes after 127.0.0.1)."""
    seen = {"localhost": "127.0.0.1"}
    seen.setdefault(v.name, v.ip)
    for link in v.links:
        if link.address:
            seen.setdefault(link.alias, link.address)
            seen.setdefault(link.target, link.address)
    return {link.alias: link for link in v.links if link.address}, seen


def dns_data(topo: Topology, views_: dict[str, View] | None = None) -> DnsData:
    """`views_`: the topology's views when the caller has them already."""
    names, links, hosts_names = {}, {}, {}
    for v in (views_ if views_ is not None else views(topo)).values():
        if v.ip:
            names[v.name] = v.ip
            links[v.ip], hosts_names[v.ip] = _dns_entries(v)
    return DnsData(names, links, None, hosts_names)


def update_dns(prev: DnsData, prev_views: dict[str, View], views_: dict[str, View], touched: set[str]) -> DnsData:
    """`dns_data` of `views_`, recomputed only for `touched` (the names whose
    views may differ from `prev_views`). Two passes: an address can change
    hands between two touched names, never to or from an untouched one."""
    names, links, hosts_names = dict(prev.names), dict(prev.links), dict(prev.hosts)
    for name in touched:
        old = prev_views.get(name)
        if old is not None and old.ip:
            names.pop(name, None)
            links.pop(old.ip, None)
            hosts_names.pop(old.ip, None)
    for name in touched:
        v = views_.get(name)
        if v is not None and v.ip:
            names[name] = v.ip
            links[v.ip], hosts_names[v.ip] = _dns_entries(v)
    return DnsData(names, links, None, hosts_names)
