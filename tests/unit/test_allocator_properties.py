"""Property tests: random start/stop/rm sequences against a /29 (5 addresses).

A tiny simulator keeps the lease table (ip -> Holder) and changes it only as
`choose` says: the chosen key goes to the starting name; on eviction the
victim loses its lease. Invariants are checked after every step.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused.allocator import Choice, Exhausted, HeldByRunning, Holder, address_pool, address_pool_size, choose, claim

NET = ipaddress.IPv4Network("10.213.0.0/29")
POOL = list(address_pool(NET))
NAMES = ["a", "b", "c", "d", "e", "f", "g", "h"]  # more names than addresses

assert len(POOL) == address_pool_size(NET) == 5


class Sim:
    def __init__(self) -> None:
        self.held: dict[str, Holder] = {}
        self.now = 1000.0
        self.running: dict[str, str] = {}  # name -> the address it got at start
        self.sticky: dict[str, str] = {}  # stopped name -> address it stopped with, while not evicted
        self.evictions = 0
        self.exhausted = 0

    def tick(self) -> float:
        self.now += 1.0  # strictly increasing fake time
        return self.now

    def lease_of(self, name: str) -> str | None:
        keys = [k for k, h in self.held.items() if h.name == name]
        assert len(keys) <= 1, f"{name} holds {keys}"
        return keys[0] if keys else None

    # --- operations --------------------------------------------------------
    def start(self, name: str) -> None:
        if name in self.running:
            return
        current = self.lease_of(name)
        before = dict(self.held)
        free = [k for k in POOL if k not in before]
        try:
            c = choose(address_pool(NET), before, name, current)
        except Exhausted:
            self.exhausted += 1
            # Exhausted only when every address is held by a running container
            assert len(before) == len(POOL)
            assert all(h.running for h in before.values()), before
            assert current is None
            return
        assert isinstance(c, Choice)
        assert c.key in POOL
        if name in self.sticky:
            # stickiness: restarted and not evicted in between -> same address
            assert c.key == self.sticky[name]
            assert c.evict is None
        if current is not None:
            assert c.key == current and c.evict is None
        if c.evict is None:
            if c.key in before:
                assert before[c.key].name == name
            else:
                # free first, in pool order
                assert c.key == free[0]
        else:
            # eviction only when nothing was free, never a running holder,
            # always the stopped holder that stopped longest ago
            assert not free
            victim = before[c.key]
            assert victim.name == c.evict
            assert victim.name != name
            assert not victim.running
            oldest = min(h.stopped_at for h in before.values() if not h.running and h.name != name)
            assert victim.stopped_at == oldest
            del self.held[c.key]
            self.sticky.pop(victim.name, None)
            self.evictions += 1
        self.held[c.key] = Holder(name, True, None)
        self.running[name] = c.key
        self.sticky.pop(name, None)

    def stop(self, name: str) -> None:
        ip = self.running.pop(name, None)
        if ip is None:
            return
        self.held[ip] = Holder(name, False, self.tick())
        self.sticky[name] = ip

    def rm(self, name: str) -> None:
        if name in self.running:
            return  # only a stopped container can be removed
        ip = self.lease_of(name)
        if ip is not None:
            del self.held[ip]
        self.sticky.pop(name, None)

    # --- invariants --------------------------------------------------------
    def check(self) -> None:
        names = [h.name for h in self.held.values()]
        assert len(names) == len(set(names)), "a name holds two addresses"
        assert set(self.held) <= set(POOL)
        for name, ip in self.running.items():
            # a running container keeps its address
            assert self.held.get(ip) == Holder(name, True, None), (name, ip, self.held)
        for ip, h in self.held.items():
            assert h.running == (h.name in self.running)
            if not h.running:
                assert h.stopped_at is not None
        for name, ip in self.sticky.items():
            assert self.held.get(ip, Holder("", True)).name == name


# starts twice as likely as stops or removals, and long enough sequences, so that
# the pool fills up and evictions among several stopped holders are common
ops = st.lists(
    st.tuples(st.sampled_from(["start", "start", "stop", "rm"]), st.sampled_from(NAMES)), min_size=10, max_size=80
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_lifecycles_keep_lease_invariants(seq):
    sim = Sim()
    for op, name in seq:
        getattr(sim, op)(name)
        sim.check()


def test_simulator_reaches_eviction_and_exhaustion():
    """The scenario space above really contains evictions and exhaustion."""
    sim = Sim()
    for n in "abcde":
        sim.start(n)
        sim.check()
    sim.start("f")
    assert sim.exhausted == 1
    for n in "cab":  # stop order: c oldest, then a, then b
        sim.stop(n)
    sim.start("f")
    sim.start("g")
    sim.check()
    assert sim.evictions == 2
    # c (stopped first) and a (second) lost their addresses; b kept its own
    assert sim.lease_of("c") is None and sim.lease_of("a") is None
    assert sim.running["f"] == "10.213.0.4"  # c's old address
    assert sim.running["g"] == "10.213.0.2"  # a's old address
    assert sim.sticky == {"b": "10.213.0.3"}
    sim.start("b")
    assert sim.running["b"] == "10.213.0.3"
    sim.start("c")  # evicted, nothing stopped left: exhausted
    assert sim.exhausted == 2


holders = st.builds(
    Holder,
    name=st.sampled_from(NAMES),
    running=st.booleans(),
    stopped_at=st.floats(min_value=0, max_value=1e6, allow_nan=False),
).map(lambda h: Holder(h.name, True, None) if h.running else h)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(POOL), holders), st.sampled_from(POOL), st.sampled_from(NAMES))
def test_claim_rules(held, key, name):
    h = held.get(key)
    if h is not None and h.name != name and h.running:
        try:
            claim(key, held, name)
        except HeldByRunning as e:
            assert e.holder == h.name and e.key == key
        else:
            raise AssertionError("claimed a running holder's key")
        return
    c = claim(key, held, name)
    assert c.key == key
    if h is None or h.name == name:
        assert c.evict is None
    else:
        assert c.evict == h.name
