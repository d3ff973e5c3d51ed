"""Pure lease choice: sticky, then free, then the least recently stopped.

The same rules serve IP addresses and host ports (DESIGN "Leases"). A pool is
any iterable of keys in preference order; `held` maps each leased key to its
holder. No I/O here.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Container, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class Pool(Protocol[K]):
    """Keys in preference order, with membership (a `range` of ports is one)."""

    def __iter__(self) -> Iterator[K]: ...

    def __contains__(self, key: object) -> bool: ...


@dataclass(frozen=True)
class Holder:
    name: str
    running: bool
    stopped_at: float | None = None  # when it stopped; None while running


@dataclass(frozen=True)
class Choice(Generic[K]):
    key: K
    evict: str | None = None  # the stopped holder that loses this key, if any


class Exhausted(Exception):
    pass


class HeldByRunning(Exception):
    def __init__(self, key: object, holder: str) -> None:
        super().__init__(f"{key} is held by running container {holder!r}")
        self.key = key
        self.holder = holder


def _lru_victim(pool: Container[K], held: Mapping[K, Holder], exclude: str) -> tuple[K, Holder] | None:
    stopped = [
        (h.stopped_at or 0.0, str(k), k, h)
        for k, h in held.items()
        if not h.running and h.name != exclude and k in pool
    ]
    if not stopped:
        return None
    _, _, key, holder = min(stopped, key=lambda t: (t[0], t[1]))
    return key, holder


def choose(pool: Pool[K], held: Mapping[K, Holder], name: str, current: K | None = None) -> Choice[K]:
    """Pick a key for `name`.

    `current`: the key `name` holds now (sticky) or None. Raises Exhausted when
    every key is held by a running container.
    """
    if current is not None and current in pool:
        h = held.get(current)
        if h is None or h.name == name:
            return Choice(current)
    for key in pool:
        if key not in held:
            return Choice(key)
    victim = _lru_victim(pool, held, name)
    if victim is None:
        raise Exhausted()
    return Choice(victim[0], evict=victim[1].name)


def claim(key: K, held: Mapping[K, Holder], name: str) -> Choice[K]:
    """Take an explicitly requested key: free, ours, or a stopped holder's."""
    h = held.get(key)
    if h is None or h.name == name:
        return Choice(key)
    if h.running:
        raise HeldByRunning(key, h.name)
    return Choice(key, evict=h.name)


def dotted(i: int) -> str:
    """An IPv4 address as text (what ipaddress does, without its objects: an
    allocation at 1000 containers walks 1000 of them)."""
    return f"{i >> 24}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def undotted(key: object) -> int | None:
    """The inverse of `dotted`; None for anything that is not a dotted quad."""
    if not isinstance(key, str):
        return None
    parts = key.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 and (p == "0" or p[0] != "0") for p in parts):
        return None
    a, b, c, d = map(int, parts)
    return (a << 24) | (b << 16) | (c << 8) | d


class AddressPool:
    """Container addresses of a subnet: every host address but the gateway (the first)."""

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        self.network = network
        n = int(network.network_address)
        # /31 and /32 have no network or broadcast address to skip
        self._first, self._last = (n + 1, n + network.num_addresses - 2) if network.prefixlen < 31 else (n, n - 1)
        self._first += 1  # the gateway

    def __iter__(self) -> Iterator[str]:
        for i in range(self._first, self._last + 1):
            yield dotted(i)

    def __contains__(self, key: object) -> bool:
        i = undotted(key)
        return i is not None and self._first <= i <= self._last

    def __len__(self) -> int:
        return max(self._last - self._first + 1, 0)


def address_pool(network: ipaddress.IPv4Network) -> AddressPool:
    return AddressPool(network)


def address_pool_size(network: ipaddress.IPv4Network) -> int:
    return len(AddressPool(network))
