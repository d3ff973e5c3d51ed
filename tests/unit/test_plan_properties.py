"""fused.plan, as hypothesis drives it: whole lifecycles of starts, stops,
removals, links and moves on the in-memory store, with invariants checked
after every step (DESIGN "Leases", "Links and retargeting")."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused import model, plan
from fused.config import NetworkConfig
from fused.errors import ServiceError
from fused.store.base import Draft
from fused.store.memory import MemoryStore

NET = NetworkConfig(subnet="10.9.0.0/29", facade_subnet="10.10.0.0/28", port_range="40000-40003")
NAMES = ["a", "b", "c", "d", "e", "f", "g"]  # more names than the 5 addresses

op = st.one_of(
    st.tuples(st.just("start"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("stop"), st.sampled_from(NAMES)),
    st.tuples(st.just("rm"), st.sampled_from(NAMES)),
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("move"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)


class World:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.pid = 100
        self.now = 1000.0
        self.last_ip: dict[str, str] = {}
        self.reached = {"evicted": 0, "exhausted": 0, "moved": 0}

    def step(self, action) -> None:
        self.now += 1
        d = Draft(self.store.snapshot())
        kind, name = action[0], action[1]
        try:
            if kind == "start":
                c = d.container(name)
                if c is not None and c.running:
                    return
                self.pid += 1
                publish = [model.PublishSpec(80)] if action[2] else []
                reg = model.Registration(name, name, self.pid, "/b", [], [model.PortSpec(80)], publish)
                done = plan.register(d, reg, self.pid, (), NET, self.now, lambda c: True, lambda p, proto: False)
                self.reached["evicted"] += len(done.evicted)
                if name in self.last_ip:  # sticky: the same address again, unless it was evicted meanwhile
                    assert done.ip == self.last_ip[name], (name, done.ip, self.last_ip[name])
                self.last_ip[name] = done.ip
                for loser in done.evicted:
                    self.last_ip.pop(loser, None)
            elif kind == "stop":
                if d.container(name) is None or not d.container(name).running:
                    return
                plan.stop(d, name, self.now)
            elif kind == "rm":
                if d.container(name) is None or d.container(name).running:
                    return
                plan.remove(d, name)
                self.last_ip.pop(name, None)
            elif kind == "link":
                if d.container(name) is None or d.link(name, action[2]) is not None:
                    return
                plan.link_add(d, name, action[2], action[2], NET)
            else:
                old, new = name, action[2]
                before = {(l.consumer, l.alias) for l in d.links() if d.target(l) == old}
                moved = plan.move(d, old, new)
                assert {(l.consumer, l.alias) for l in moved.links} == before  # every alias kept
                assert all(d.target(d.link(c, a)) == new for c, a in before)
                self.reached["moved"] += bool(before)
        except ServiceError as e:
            if "exhausted" in str(e):
                self.reached["exhausted"] += 1
            return  # refused: nothing is committed
        self.store.commit(d.change, d.snap.revision)
        self.check()

    def check(self) -> None:
        snap = self.store.snapshot()
        running = {n for n, c in snap.containers.items() if c.running}
        ips = [l.ip for l in snap.ip_leases.values()]
        assert len(ips) == len(set(ips))  # one holder per address, ever
        assert all(n in snap.ip_leases for n in running)  # a running container has its address
        assert all(l.name in snap.containers for l in snap.port_leases.values())
        facades = [l.facade for l in snap.links.values() if l.facade]
        assert len(facades) == len(set(facades))
        for (consumer, alias), l in snap.links.items():
            assert consumer in snap.containers and (l.consumer, l.alias) == (consumer, alias)
        # every link's group has its one target (a move rewrites one record
        # and one rule per group), and no group is left without a link
        assert {l.group for l in snap.links.values()} == set(snap.groups), snap.groups


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=60))
def test_lifecycles_keep_the_lease_and_link_rules(actions):
    w = World()
    for a in actions:
        w.step(a)


def test_the_lifecycles_reach_eviction_exhaustion_and_moves():
    """The generator really gets there: a property that never meets an
    eviction proves nothing about evictions."""
    totals = {"evicted": 0, "exhausted": 0, "moved": 0}

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.lists(op, min_size=20, max_size=60))
    def run(actions):
        w = World()
        for a in actions:
            w.step(a)
        for k in totals:
            totals[k] += w.reached[k]

    run()
    assert all(v > 0 for v in totals.values()), totals
