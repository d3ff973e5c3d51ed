"""Pure: each source address's budget of DNS queries ([dns] per_client_qps),
checked before a query is parsed.

A source has two token buckets of `qps` tokens, each refilled at `qps` a
second (a second's worth of burst). A query takes a token from the first and
is answered; when that one is empty, from the second, and gets REFUSED; when
both are empty it is dropped unanswered. So a flooding source gets its
budget answered, as many REFUSED, and nothing more: what it costs the
responder past its budget is a dictionary lookup a packet, and the answers
it sends stay bounded (the same line the kernel's limit, when the firewall
has one, draws at twice the budget). Refused and dropped queries are counted
per source and handed out once a period by `tick`, for one log line.
"""
from __future__ import annotations

from typing import NamedTuple

ANSWER, REFUSE, DROP = 0, 1, 2
OTHERS = "(others)"  # the one bucket new sources share while the table is full
MAX_SOURCES = 65536

# a bucket: [answer tokens, refusal tokens, last query's time, refused, dropped]
_ANSWER, _REFUSE, _LAST, _REFUSED, _DROPPED = range(5)


class Over(NamedTuple):
    """A source that went over its budget since the last tick."""

    source: str
    refused: int
    dropped: int


class Budget:
    def __init__(self, qps: float, max_sources: int = MAX_SOURCES) -> None:
        self.rate = float(qps)
        self.burst = float(qps)
        self.max_sources = max_sources
        self.buckets: dict[str, list] = {}

    def spend(self, source: str, now: float) -> int:
        """ANSWER, REFUSE or DROP for one query from `source` at `now` (seconds)."""
        b = self.buckets.get(source)
        if b is None and len(self.buckets) >= self.max_sources:  # only a spoofer has that many at once
            source = OTHERS
            b = self.buckets.get(OTHERS)
        if b is None:
            b = self.buckets[source] = [self.burst, self.burst, now, 0, 0]
        else:
            gained = (now - b[_LAST]) * self.rate
            if gained > 0:
                b[_LAST] = now
                burst = self.burst
                t = b[_ANSWER] + gained
                b[_ANSWER] = t if t < burst else burst
                t = b[_REFUSE] + gained
                b[_REFUSE] = t if t < burst else burst
        if b[_ANSWER] >= 1.0:
            b[_ANSWER] -= 1.0
            return ANSWER
        if b[_REFUSE] >= 1.0:
            b[_REFUSE] -= 1.0
            b[_REFUSED] += 1
            return REFUSE
        b[_DROPPED] += 1
        return DROP

    def tick(self, now: float) -> list[Over]:
        """The sources that went over their budget since the last tick (their
        counts start again from zero), and forget the sources idle long enough
        to have full buckets again, so the table holds only recent ones."""
        over = []
        idle = self.burst / self.rate
        # a copy: a TCP connection's thread may add a source meanwhile
        for source, b in list(self.buckets.items()):
            if b[_REFUSED] or b[_DROPPED]:
                over.append(Over(source, b[_REFUSED], b[_DROPPED]))
                b[_REFUSED] = b[_DROPPED] = 0
            elif now - b[_LAST] >= idle:
                del self.buckets[source]
        return sorted(over, key=lambda o: -(o.refused + o.dropped))


def report(over: list[Over], qps: float, seconds: float, most: int = 5) -> str:
    """The one log line for a tick's sources over their budget."""
    parts = [f"{o.source} refused {o.refused}, dropped {o.dropped}" for o in over[:most]]
    if len(over) > most:
        parts.append(f"and {len(over) - most} more source(s)")
    return f"over the budget of {qps:g} queries/s per source in the last {seconds:.1f} s: " + "; ".join(parts)
