"""Several hosts, the pure parts: settings, what a host's death and return
do to the records, which host ports a host forwards, the rules' reply path,
and that the core imports no etcd client."""
from __future__ import annotations

import pytest

from fused import plan, rules
from fused.config import Config
from fused.model import Container, IpLease, PortLease
from fused.store.base import Draft, StoreSnapshot
from test_imports import HEAVY, loaded_after


def running(name: str, host: str, pid: int = 10) -> Container:
    return Container(name, name, "running", pid, 4026530000 + pid, "", 1.0, 1.0, host=host)


def snap(*cs: Container) -> StoreSnapshot:
    return StoreSnapshot(1, {c.name: c for c in cs}, {c.name: IpLease(f"10.0.0.{i + 2}", c.name, "m", 1.0)
                                                         for i, c in enumerate(cs)})


@pytest.mark.parametrize("store,cluster,needle", [
    ({"endpoints": []}, {}, "at least one etcd endpoint"),
    ({"endpoints": ["etcd:2379"]}, {}, "use http://HOST:PORT"),
    ({"prefix": "/a/"}, {}, "no trailing /"),
    ({}, {"host": "H1"}, "not an RFC 1123 label"),
    ({}, {"underlay": "10.0.0.300"}, "underlay"),
    ({}, {"vxlan_id": 0}, "vxlan_id"),
    ({}, {"lease_ttl": 1}, "lease_ttl"),
])
def test_bad_cluster_settings_name_the_key(store, cluster, needle):
    with pytest.raises(ValueError, match=needle):
        Config(store={"backend": "etcd", **store}, cluster=cluster)


def test_cluster_defaults():
    c = Config()
    assert (c.store.backend, c.store.endpoints, c.store.prefix) == ("sqlite", ["http://127.0.0.1:2379"], "/tether")
    assert (c.cluster.host, c.cluster.underlay, c.cluster.vxlan_id, c.cluster.lease_ttl) == ("", "", 4213, 10)
    assert Config(cluster={"host": "h1"}).cluster.host_name == "h1"


def test_a_dead_hosts_container_is_stopped_keeping_its_process_and_comes_back():
    s = snap(running("web", "h2"), running("app", "h1", 11))
    d = Draft(s)
    dead = plan.stop_dead(d, lambda c: c.host == "h1", 5.0, host="h1")  # h2's lease expired
    assert dead == ["web"]
    web = d.container("web")
    assert (web.state, web.pid, web.netns_ino, web.stopped_at) == ("stopped", 10, 4026530010, 5.0)
    assert "its host h2 was gone" in web.note
    # h2 back, web still running there: running again; h1 revives nothing of h2's
    after = d.after()
    assert plan.revive(Draft(after), lambda c: True, "h1", 6.0) == []
    d2 = Draft(after)
    assert plan.revive(d2, lambda c: True, "h2", 6.0) == ["web"]
    assert d2.container("web").running and d2.container("web").stopped_at is None
    # died meanwhile: stopped for good, never looked at again
    d3 = Draft(after)
    assert plan.revive(d3, lambda c: False, "h2", 6.0) == []
    assert d3.container("web").pid is None and d3.container("web").stopped_at == 5.0


def test_a_container_of_this_host_that_died_is_stopped_as_ever():
    d = Draft(snap(running("app", "h1")))
    assert plan.stop_dead(d, lambda c: False, 5.0, host="h1") == ["app"]
    assert d.container("app").pid is None


def test_a_host_forwards_only_its_own_containers_host_ports():
    s = snap(running("a", "h1"), running("b", "h2", 11))
    s = StoreSnapshot(1, s.containers, s.ip_leases, {(40000, "tcp"): PortLease(40000, "tcp", "a", 80),
                                                    (40001, "tcp"): PortLease(40001, "tcp", "b", 80)})
    assert [f.host_port for f in plan.forwards(s, "h1")] == [40000]
    assert sorted(f.host_port for f in plan.forwards(s)) == [40000, 40001]  # one host: every one


def test_across_hosts_a_dnat_from_a_container_keeps_its_source():
    one = rules.RuleSettings("tb0", "10.213.0.0/16", "10.214.0.0/16")
    many = rules.RuleSettings("tb0", "10.213.0.0/16", "10.214.0.0/16", cluster=True)
    reply = lambda s: [r for r in rules.build(s).chains[("nat", "POSTROUTING")] if r.comment == "tether reply path"]  # noqa: E731
    assert [r.not_src for r in reply(one)] == [None]
    assert [r.not_src for r in reply(many)] == ["10.213.0.0/16"]


def test_the_core_imports_no_etcd_client():
    assert loaded_after("fused.plan, fused.graph, fused.render, fused.rules, fused.store.base", HEAVY + ("etcd3gw", "requests")) == []


def test_a_dead_hosts_containers_are_stopped_a_transactions_worth_at_a_time():
    d = Draft(snap(*(running(f"c{i}", "h2", 10 + i) for i in range(5))))
    assert plan.stop_dead(d, lambda c: False, 5.0, host="h1", limit=3) == ["c0", "c1", "c2"]
    assert [c.name for c in d.containers() if c.running] == ["c3", "c4"]
