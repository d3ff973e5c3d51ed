"""Pure lease choice: sticky, then free, then the least recently stopped.

The same rules serve IP addresses and host ports (DESIGN "Leases"). A pool is
any iterable of keys in preference order; `held` maps each leased key to its
holder. No I/O here.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


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


def _lru_victim(held: Mapping[K, Holder], exclude: str) -> tuple[K, Holder] | None:
    stopped = [(h.stopped_at or 0.0, str(k), k, h) for k, h in held.items() if not h.running and h.name != exclude]
    if not stopped:
        return None
    _, _, key, holder = min(stopped, key=lambda t: (t[0], t[1]))
    return key, holder


def choose(pool: Iterable[K], held: Mapping[K, Holder], name: str, current: K | None = None) -> Choice[K]:
    """Pick a key for `name`.

    `current`: the key `name` holds now (sticky) or None. Raises Exhausted when
    every key is held by a running container.
    """
    if current is not None:
        h = held.get(current)
        if h is None or h.name == name:
            return Choice(current)
    for key in pool:
        if key not in held:
            return Choice(key)
    victim = _lru_victim(held, name)
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


def address_pool(network: ipaddress.IPv4Network) -> Iterator[str]:
    """Container addresses: every host address but the gateway (the first)."""
    hosts = network.hosts()
    next(hosts, None)  # the gateway
    for a in hosts:
        yield str(a)


def address_pool_size(network: ipaddress.IPv4Network) -> int:
    return max(network.num_addresses - 3, 0)
