"""Validated records and the parsing of everything a user can type.

Pure: no I/O. Every name and alias that enters tether passes `check_label`.
"""
from __future__ import annotations

import ipaddress
import re
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import InputError  # model.InputError: the same class

LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

ANN_NAME = "io.tether.name"
ANN_LINKS = "io.tether.links"
ANN_EXPOSE = "io.tether.expose"
ANN_PUBLISH = "io.tether.publish"

RUNNING = "running"
STOPPED = "stopped"

PROTOS = ("tcp", "udp")


def is_label(s: object) -> bool:
    return isinstance(s, str) and LABEL_RE.fullmatch(s) is not None


# names a hosts file already gives 127.0.0.1 and ::1: a container or alias
# of that name would shadow them (and DNS would answer it elsewhere)
RESERVED = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def check_label(s: object, what: str = "name") -> str:
    if isinstance(s, str) and s in RESERVED:
        raise InputError(f"invalid {what} {s!r}: it is reserved (the hosts file gives it 127.0.0.1 and ::1); choose another")
    if not is_label(s):
        shown = repr(s)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InputError(
            f"invalid {what} {shown}: use an RFC 1123 label "
            "(1-63 of a-z, 0-9 and '-', starting and ending with a letter or digit)"
        )
    return s  # type: ignore[return-value]


def mac_for(ip: str) -> str:
    """The MAC derived from an IPv4 address: locally administered, unicast."""
    b = ipaddress.IPv4Address(ip).packed
    return "02:74:" + ":".join(f"{x:02x}" for x in b)


class PortSpec(NamedTuple):
    port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


@dataclass(frozen=True, order=True)
class PublishSpec:
    port: int
    proto: str = "tcp"
    host_port: int | None = None  # None: a sticky one from port_range

    def __str__(self) -> str:
        hp = f"{self.host_port}:" if self.host_port else ""
        return f"{hp}{self.port}/{self.proto}"


@dataclass(frozen=True, order=True)
class LinkSpec:
    alias: str
    target: str

    def __str__(self) -> str:
        return self.target if self.alias == self.target else f"{self.target}:{self.alias}"


# What tether prints (the input syntax above stays what users type). A
# published port answers on every host address: the rules match local dst.
PUBLISHED_RE = re.compile(r"0\.0\.0\.0:([0-9]{1,5})->([0-9]{1,5})/(tcp|udp)")


class Published(NamedTuple):
    """A host port forwarding to a container port, written as podman and
    docker write it: `0.0.0.0:40000->5432/tcp`."""

    host_port: int
    port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"0.0.0.0:{self.host_port}->{self.port}/{self.proto}"

    @classmethod
    def parse(cls, s: str) -> Published:
        m = PUBLISHED_RE.fullmatch(s)
        if m is None:
            raise InputError(f"bad published port {s!r}: expected the form 0.0.0.0:40000->5432/tcp")
        return cls(int(m[1]), int(m[2]), m[3])


def link_text(alias: str, target: str, consumer: str | None = None) -> str:
    """A link as tether prints it: `web:database->db`, or `database->db` in
    a row that already belongs to its consumer."""
    return f"{consumer}:{alias}->{target}" if consumer else f"{alias}->{target}"


def _items(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _port(s: str, key: str) -> int:
    if not (s.isascii() and s.isdigit() and len(s) <= 5) or not (1 <= int(s) <= 65535):
        raise InputError(f"{key}: bad port {s!r}: use a number from 1 to 65535")
    return int(s)


def _port_proto(s: str, key: str) -> tuple[int, str]:
    port, _, proto = s.partition("/")
    proto = proto or "tcp"
    if proto not in PROTOS:
        raise InputError(f"{key}: bad protocol {proto!r} in {s!r}: use tcp or udp")
    return _port(port, key), proto


def parse_links(value: str, key: str = ANN_LINKS) -> list[LinkSpec]:
    out: dict[str, LinkSpec] = {}
    for item in _items(value):
        target, _, alias = item.partition(":")
        alias = alias or target
        try:
            check_label(target, "link target")
            check_label(alias, "link alias")
        except InputError as e:
            raise InputError(f"{key}: {e}") from None
        if alias in out and out[alias].target != target:
            raise InputError(f"{key}: alias {alias!r} is used twice: give each link its own alias")
        out[alias] = LinkSpec(alias, target)
    return sorted(out.values())


def parse_expose(value: str, key: str = ANN_EXPOSE) -> list[PortSpec]:
    return sorted({PortSpec(*_port_proto(item, key)) for item in _items(value)})


@functools.lru_cache(maxsize=4096)
def exposed(stored: tuple[str, ...]) -> tuple[PortSpec, ...]:
    """The ports of a stored expose list (already validated), cached: the
    topology is rebuilt on every change, for every container."""
    return tuple(parse_expose(",".join(stored)))


def parse_publish(value: str, key: str = ANN_PUBLISH) -> list[PublishSpec]:
    out: dict[tuple[int, str], PublishSpec] = {}
    hosts: set[tuple[int, str]] = set()
    for item in _items(value):
        host, sep, rest = item.rpartition(":")
        port, proto = _port_proto(rest, key)
        hp = _port(host, key) if sep else None
        if (port, proto) in out:
            raise InputError(f"{key}: {port}/{proto} is published twice: publish each port once")
        if hp is not None:
            if (hp, proto) in hosts:
                raise InputError(f"{key}: host port {hp}/{proto} is used twice: give each its own")
            hosts.add((hp, proto))
        out[(port, proto)] = PublishSpec(port, proto, hp)
    return sorted(out.values())


@dataclass(frozen=True)
class Registration:
    """What a createRuntime/prestart hook asks for, parsed and validated."""

    id: str
    name: str
    pid: int
    bundle: str
    links: list[LinkSpec] = field(default_factory=list)
    expose: list[PortSpec] = field(default_factory=list)
    publish: list[PublishSpec] = field(default_factory=list)


MAX_ID = 1024


def parse_registration(state: object, annotations: object) -> Registration:
    """Validate the OCI state and annotations a hook sent."""
    if not isinstance(state, dict):
        raise InputError("OCI state must be a JSON object: run tether-hook from an OCI runtime")
    cid = state.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_ID or any(c in cid for c in "\n\r\0"):
        raise InputError("OCI state has no valid 'id': run tether-hook from an OCI runtime")
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise InputError(
            "OCI state has no container 'pid': configure tether-hook as a createRuntime or prestart hook"
        )
    if pid == 1:
        raise InputError(
            "OCI state names pid 1, the host's init, not a container's process: "
            "run tether-hook from an OCI runtime, which passes the container's pid"
        )
    bundle = state.get("bundle", "")
    if not isinstance(bundle, str):
        raise InputError("OCI state 'bundle' must be a string")
    ann = annotations if annotations is not None else {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise InputError("annotations must be a JSON object of strings")
    if ANN_NAME in ann:
        try:
            name = check_label(ann[ANN_NAME])
        except InputError as e:
            raise InputError(f"{ANN_NAME}: {e}") from None
    elif is_label(cid):
        name = cid
    else:
        raise InputError(
            f"container id {cid[:80]!r} is not a valid name: set the annotation {ANN_NAME} "
            "to an RFC 1123 label (tether oci patch --name)"
        )
    links = parse_links(ann.get(ANN_LINKS, ""))
    expose = parse_expose(ann.get(ANN_EXPOSE, ""))
    publish = parse_publish(ann.get(ANN_PUBLISH, ""))
    return Registration(cid, name, pid, bundle, links, expose, publish)


# --- what the store holds (see store/base.py) -----------------------------------


@dataclass(frozen=True, slots=True)
class Container:
    """A registered name: its last start, or its stop."""

    name: str
    id: str
    state: str  # RUNNING | STOPPED
    pid: int | None = None
    netns_ino: int | None = None
    bundle: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None
    note: str = ""
    expose: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    # the command that lists it: the runtime that started it and its state
    # root, e.g. ("/usr/sbin/runc", "--root", "/run/runc"); () when unknown
    runtime: tuple[str, ...] = ()
    # addresses it answers at for others since a move (strategies veth-move
    # and reassign): held until the move is undone or it is removed
    answers: tuple[str, ...] = ()
    # the host it runs (or last ran) on, with several hosts ([store] backend
    # = "etcd"); "" on one host
    host: str = ""

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True, slots=True)
class IpLease:
    ip: str
    name: str
    mac: str
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class PortLease:
    host_port: int
    proto: str
    name: str
    port: int
    since: float = 0.0

    @property
    def key(self) -> tuple[int, str]:
        return (self.host_port, self.proto)


def overlay_name(bridge: str) -> str:
    """The VXLAN device joining `bridge` to the other hosts' (several hosts)."""
    return bridge[:12] + "-vx"


class Link(NamedTuple):
    """consumer --alias--> the target of its `group` (the links a move
    retargets together: the store keeps one target per group, so a move
    rewrites one record per group, not one per link); `facade` its stable
    address (strategy facade)."""

    consumer: str
    alias: str
    facade: str | None = None
    group: str = ""
