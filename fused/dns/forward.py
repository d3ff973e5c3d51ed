"""Sans-IO: the UDP queries in flight to the upstreams.

A query goes to the first upstream under an id of its own (two clients may
use the same id); it waits `timeout` for that upstream's answer, then goes to
the next; after the last, the client gets SERVFAIL. An answer is taken only
from an upstream asked, with the id it was asked under, and goes back to
the client with the client's id. Nothing here reads a clock or a socket: the
caller passes the time in and does what the returned records say.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from .answer import SERVFAIL, fit, short_answer

CAPACITY = 256  # queries in flight at once; past it, SERVFAIL at once


class Send(NamedTuple):
    """Send `wire` to the upstream `to`."""

    wire: bytes
    to: tuple[str, int]


class Reply(NamedTuple):
    """Send `wire` to the client."""

    wire: bytes
    client: tuple[str, int]


@dataclass
class _Pending:
    wire: bytes  # the client's query, with the client's id
    client: tuple[str, int]
    limit: int | None
    upstream: int  # the index of the upstream asked
    deadline: float


class Forwarder:
    def __init__(self, upstreams: list[tuple[str, int]], timeout: float, capacity: int = CAPACITY,
                 rng: random.Random | None = None) -> None:
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.capacity = capacity
        self.rng = rng or random.SystemRandom()
        self.pending: dict[int, _Pending] = {}

    def start(self, wire: bytes, client: tuple[str, int], limit: int | None, now: float) -> Send | Reply:
        if not self.upstreams or len(self.pending) >= self.capacity:
            return Reply(short_answer(wire, SERVFAIL) or b"", client)
        qid = self.rng.randrange(1 << 16)
        while qid in self.pending:
            qid = self.rng.randrange(1 << 16)
        self.pending[qid] = _Pending(wire, client, limit, 0, now + self.timeout)
        return Send(qid.to_bytes(2, "big") + wire[2:], self.upstreams[0])

    def answer(self, wire: bytes, sender: tuple[str, int]) -> Reply | None:
        """An upstream's answer: the client's reply, or None (not one we wait for)."""
        if len(wire) < 12:
            return None
        qid = int.from_bytes(wire[:2], "big")
        p = self.pending.get(qid)
        if p is None or sender not in self.upstreams[: p.upstream + 1]:  # a late answer of one asked before counts
            return None
        del self.pending[qid]
        return Reply(fit(p.wire, p.wire[:2] + wire[2:], p.limit), p.client)

    def expire(self, now: float) -> list[Send | Reply]:
        """What to do for the queries whose upstream did not answer in time:
        ask the next upstream, or answer the client SERVFAIL."""
        out: list[Send | Reply] = []
        for qid, p in list(self.pending.items()):
            if p.deadline > now:
                continue
            p.upstream += 1
            if p.upstream < len(self.upstreams):
                p.deadline = now + self.timeout
                out.append(Send(qid.to_bytes(2, "big") + p.wire[2:], self.upstreams[p.upstream]))
            else:
                del self.pending[qid]
                out.append(Reply(short_answer(p.wire, SERVFAIL) or b"", p.client))
        return out

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self.pending.values()), default=None)
