"""`rules.build` without a kernel: the exact records a topology asks for, and
what a change does to them as the driver sees it (a diff of two RuleSets)."""
from __future__ import annotations

from fused import rules
from fused.graph import Edge, Node, Shape, Topology
from fused.model import PortSpec
from fused.net.firewall.base import HOOKS, Rule, RuleSet
from fused.rules import PortForward, RuleSettings, group_chain

S = RuleSettings(bridge="tb0", subnet="10.213.0.0/16", facade_subnet="10.214.0.0/16")
DB, DB2, CACHE = "10.213.0.3", "10.213.0.4", "10.213.0.5"


def nodes(**ips: str | None) -> dict[str, Node]:
    base = {"web": "10.213.0.2", "api": "10.213.0.6", "db": DB, "db2": DB2, "cache": CACHE} | ips
    return {n: Node(n, ip, True, (PortSpec(5432, "tcp"),)) for n, ip in base.items()}


def facade_topo(db_target: str = "db", **ips: str | None) -> Topology:
    # edges as a Topology holds them (plan.topology): by consumer, then alias;
    # build keeps that order for the jumps (no sort per change)
    links = [
        ("api", "db", db_target, "10.214.0.2", "db"),
        ("web", "cache", "cache", "10.214.0.10", "cache"),
        ("web", "database", db_target, "10.214.0.9", "db"),
    ]
    return Topology.of(nodes(**ips), links, "facade")


PORTS = [PortForward(40001, "udp", DB, 5353), PortForward(40000, "tcp", DB, 5432)]


def jump(facade: str, group: str) -> Rule:
    return Rule("@" + group_chain(group), dst=f"{facade}/32", in_iface="tb0")


def dnat_port(host_port: int, proto: str, to: str) -> Rule:
    return Rule("DNAT", proto=proto, dport=host_port, dst_local=True, to=to)


POSTROUTING = [
    Rule("MASQUERADE", src="10.213.0.0/16", not_out_iface="tb0", comment="tether masquerade"),
    Rule("MASQUERADE", out_iface="tb0", ctstate="DNAT", comment="tether reply path"),
]
FORWARD = [
    Rule("REJECT", dst="10.214.0.0/16", comment="tether dangling link"),
    Rule("ACCEPT", in_iface="tb0", comment="tether from bridge"),
    Rule("ACCEPT", out_iface="tb0", comment="tether to bridge"),
]


def diff(old: RuleSet, new: RuleSet) -> dict[tuple[str, str], tuple[list[Rule], list[Rule]]]:
    """Per chain, the rules the iptables driver rewrites: the middle part that
    differs once the common head and tail are taken off (its `_edit`)."""
    out = {}
    for key in dict.fromkeys([*old.chains, *new.chains]):
        a, b = old.chains.get(key, []), new.chains.get(key, [])
        if a == b:
            continue
        p = 0
        while p < len(a) and p < len(b) and a[p] == b[p]:
            p += 1
        s = 0
        while s < len(a) - p and s < len(b) - p and a[-1 - s] == b[-1 - s]:
            s += 1
        out[key] = (a[p : len(a) - s], b[p : len(b) - s])
    return out


def test_rule_settings_come_from_the_network_settings_and_nothing_else():
    from fused.config import Config

    net = Config().network
    assert RuleSettings.of(net) == RuleSettings(net.bridge, net.subnet, net.facade_subnet)
    assert rules.build(RuleSettings.of(net)).chains == rules.build(RuleSettings("tether0", "10.213.0.0/16", "10.214.0.0/16")).chains


def test_the_exact_records_of_a_small_facade_topology():
    rs = rules.build(S, facade_topo(), PORTS)
    assert rs.chains == {
        ("nat", "PREROUTING"): [
            jump("10.214.0.2", "db"),
            jump("10.214.0.10", "cache"),
            jump("10.214.0.9", "db"),
            dnat_port(40000, "tcp", f"{DB}:5432"),
            dnat_port(40001, "udp", f"{DB}:5353"),
        ],
        ("nat", "OUTPUT"): [dnat_port(40000, "tcp", f"{DB}:5432"), dnat_port(40001, "udp", f"{DB}:5353")],
        ("nat", "POSTROUTING"): POSTROUTING,
        ("filter", "FORWARD"): FORWARD,
        ("filter", "INPUT"): [],  # no [dns] in S: no limit
        # one DNAT per group, however many links it holds
        ("nat", group_chain("cache")): [Rule("DNAT", to=CACHE, comment="tether group cache")],
        ("nat", group_chain("db")): [Rule("DNAT", to=DB, comment="tether group db")],
    }
    # hooks first, then the group chains by group name
    assert list(rs.chains) == [*HOOKS, ("nat", group_chain("cache")), ("nat", group_chain("db"))]


def test_group_chain_names_are_stable_and_fit_iptables():
    # a pure function of the group name (no per-process hash seed): a restarted
    # daemon finds its chains under the same names
    assert group_chain("db") == "G0352a8acc949"
    longest_prefix = "X" * 12  # config.FirewallConfig allows 12 characters
    assert len(f"{longest_prefix}-{group_chain('db#123456')}") <= 28


def test_two_groups_never_share_a_chain():
    # their 8-hex-digit hashes were equal: both DNATs went into one chain and the
    # first took the links of both groups
    a, b = "c59796", "c67177"
    assert group_chain(a) != group_chain(b)
    topo = Topology.of(
        {"web": Node("web", "10.213.0.2", True), a: Node(a, DB, True), b: Node(b, DB2, True)},
        [("web", a, a, "10.214.0.1", a), ("web", b, b, "10.214.0.2", b)],
        "facade",
    )
    rs = rules.build(S, topo)
    assert rs.chains[("nat", group_chain(a))] == [Rule("DNAT", to=DB, comment=f"tether group {a}")]
    assert rs.chains[("nat", group_chain(b))] == [Rule("DNAT", to=DB2, comment=f"tether group {b}")]


def test_build_is_deterministic_whatever_the_order_of_nodes_and_ports():
    topo = facade_topo()
    shuffled = topo._replace(nodes=dict(reversed(topo.nodes.items())))
    a, b = rules.build(S, topo, PORTS), rules.build(S, shuffled, PORTS[::-1])
    assert a.chains == b.chains and list(a.chains) == list(b.chains)


def test_a_move_rewrites_one_group_dnat_rule_only():
    # `tether move db db2`: every link to db now targets db2, in the same group
    before = rules.build(S, facade_topo("db"), PORTS)
    after = rules.build(S, facade_topo("db2"), PORTS)
    assert diff(before, after) == {
        ("nat", group_chain("db")): (
            [Rule("DNAT", to=DB, comment="tether group db")],
            [Rule("DNAT", to=DB2, comment="tether group db")],
        )
    }


def test_a_move_of_1000_links_is_still_one_rule():
    n = 1000
    links = [(f"c{i}", "db", "db", f"10.214.{i // 250}.{i % 250 + 1}", "db") for i in range(n)]
    topo = Topology.of(nodes() | {f"c{i}": Node(f"c{i}", None, True) for i in range(n)}, links, "facade")
    before = rules.build(S, topo)
    moved = topo._replace(groups={"db": "db2"})
    after = rules.build(S, moved)
    assert len(before.chains[("nat", "PREROUTING")]) == n
    assert diff(before, after) == {
        ("nat", group_chain("db")): (
            [Rule("DNAT", to=DB, comment="tether group db")],
            [Rule("DNAT", to=DB2, comment="tether group db")],
        )
    }


def test_a_retarget_moves_one_link_into_another_group():
    # `tether link retarget web database db2`: the service gives that link a
    # group whose links all go to db2; only its jump changes, and db2's group
    # chain appears
    before = rules.build(S, facade_topo())
    topo = facade_topo()
    edges = tuple(e._replace(group="db2") if e.alias == "database" else e for e in topo.edges)
    after = rules.build(S, topo._replace(edges=edges, groups={**topo.groups, "db2": "db2"}, shape=Shape(edges)))
    assert diff(before, after) == {
        ("nat", "PREROUTING"): ([jump("10.214.0.9", "db")], [jump("10.214.0.9", "db2")]),
        ("nat", group_chain("db2")): ([], [Rule("DNAT", to=DB2, comment="tether group db2")]),
    }


def test_a_group_whose_target_has_no_address_has_no_rules():
    # db evicted (no address) or removed: its facades hit the REJECT in FORWARD
    for topo in (facade_topo(db=None), facade_topo(db_target="gone")):
        rs = rules.build(S, topo)
        assert rs.chains[("nat", "PREROUTING")] == [jump("10.214.0.10", "cache")]
        assert ("nat", group_chain("db")) not in rs.chains
        assert rs.chains[("filter", "FORWARD")] == FORWARD


def test_a_stopped_target_keeps_its_group_rule():
    # its address is sticky: the DNAT waits for it to start again
    topo = facade_topo()
    topo = topo._replace(nodes=topo.nodes | {"db": topo.nodes["db"]._replace(running=False)})
    assert rules.build(S, topo).chains[("nat", group_chain("db"))] == [Rule("DNAT", to=DB, comment="tether group db")]


def test_direct_strategy_has_no_link_rules():
    # links made under strategy direct have no facade address
    topo = facade_topo()
    direct = Topology(topo.nodes, tuple(e._replace(facade=None) for e in topo.edges), "direct", topo.groups)
    rs = rules.build(S, direct, PORTS)
    assert rs.chains == {
        ("nat", "PREROUTING"): [dnat_port(40000, "tcp", f"{DB}:5432"), dnat_port(40001, "udp", f"{DB}:5353")],
        ("nat", "OUTPUT"): [dnat_port(40000, "tcp", f"{DB}:5432"), dnat_port(40001, "udp", f"{DB}:5353")],
        ("nat", "POSTROUTING"): POSTROUTING,
        ("filter", "FORWARD"): FORWARD,
        ("filter", "INPUT"): [],
    }


def test_no_topology_still_owns_every_hook_chain():
    rs = rules.build(S)
    assert list(rs.chains) == list(HOOKS)
    assert rs.chains[("nat", "PREROUTING")] == [] and rs.chains[("nat", "OUTPUT")] == []


def test_a_moved_published_port_rewrites_its_two_dnat_rules():
    # `tether move db db2` also hands db's host ports to db2
    before = rules.build(S, None, PORTS)
    after = rules.build(S, None, [PortForward(f.host_port, f.proto, DB2, f.port) for f in PORTS])
    d = diff(before, after)
    assert set(d) == {("nat", "PREROUTING"), ("nat", "OUTPUT")}
    for old, new in d.values():
        assert [r.to for r in old] == [f"{DB}:5432", f"{DB}:5353"]
        assert [r.to for r in new] == [f"{DB2}:5432", f"{DB2}:5353"]


def test_the_diff_helper_can_fail():
    # the checks above rely on `diff` seeing a change in the middle of a chain
    a, b = RuleSet(), RuleSet()
    for r in (Rule("A"), Rule("B"), Rule("C")):
        a.add("nat", "X", r)
    for r in (Rule("A"), Rule("Z"), Rule("C")):
        b.add("nat", "X", r)
    assert diff(a, b) == {("nat", "X"): ([Rule("B")], [Rule("Z")])}
    assert diff(a, a) == {}


ISO = RuleSettings(bridge="tb0", subnet="10.213.0.0/16", facade_subnet="10.214.0.0/16", isolation="links")


def test_isolation_allows_each_links_exposed_ports_and_icmp_and_rejects_the_rest():
    rs = rules.build(ISO, facade_topo(), PORTS)
    assert rs.chains[("filter", "FORWARD")][1] == Rule("@ISOLATE", in_iface="tb0", out_iface="tb0")
    web, api = "10.213.0.2", "10.213.0.6"
    assert rs.chains[("filter", "ISOLATE")] == [
        Rule("ACCEPT", ctstate="ESTABLISHED,RELATED", comment="tether isolation: replies"),
        Rule("ACCEPT", ctstate="DNAT", not_orig_dst="10.214.0.0/16", comment="tether isolation: published ports"),
        Rule("ACCEPT", src=api, dst=DB, proto="tcp", dport=5432),
        Rule("ACCEPT", src=api, dst=DB, proto="icmp"),
        Rule("ACCEPT", src=DB, dst=api, proto="icmp"),
        Rule("ACCEPT", src=web, dst=CACHE, proto="tcp", dport=5432),
        Rule("ACCEPT", src=web, dst=CACHE, proto="icmp"),
        Rule("ACCEPT", src=CACHE, dst=web, proto="icmp"),
        Rule("ACCEPT", src=web, dst=DB, proto="tcp", dport=5432),  # web's "database": the same target as api's
        Rule("ACCEPT", src=web, dst=DB, proto="icmp"),
        Rule("ACCEPT", src=DB, dst=web, proto="icmp"),
        Rule("REJECT", comment="tether isolation: no link"),
    ]
    # a retarget: the tuples follow the target, in the same RuleSet as the DNAT
    moved = rules.build(ISO, facade_topo("db2"), PORTS).chains[("filter", "ISOLATE")]
    assert Rule("ACCEPT", src=web, dst=DB2, proto="tcp", dport=5432) in moved
    assert Rule("ACCEPT", src=web, dst=DB, proto="tcp", dport=5432) not in moved


def test_no_isolation_no_chain_and_a_target_without_address_allows_nothing():
    assert ("filter", "ISOLATE") not in rules.build(S, facade_topo(), PORTS).chains
    rs = rules.build(ISO, facade_topo(db=None), PORTS)
    assert not [r for r in rs.chains[("filter", "ISOLATE")] if r.dst == DB]


def test_a_move_keeps_the_shapes_jumps_and_retargets_its_group():
    """Same shape (a move: only targets change): the jump list is the same
    object, the group's DNAT names the new target; a target without an
    address drops its group's jumps even with the shape kept."""
    before = facade_topo()
    shape = before.shape
    after = facade_topo("db2")._replace(shape=shape)
    a, b = rules.build(S, before), rules.build(S, after)
    assert b.jumps is a.jumps and b.chains[("nat", "PREROUTING")] == a.chains[("nat", "PREROUTING")]
    assert b.chains[("nat", group_chain("db"))] == [Rule("DNAT", to=DB2, comment="tether group db")]
    gone = rules.build(S, facade_topo("db2", db2=None)._replace(shape=shape))
    assert gone.jumps == [jump("10.214.0.10", "cache")] and gone.jumps is not a.jumps
    assert rules.build(S, after).jumps == a.jumps


def test_a_new_shape_builds_its_jumps_again():
    """A link added (a new shape): its jump is there, in the topology's order."""
    a = rules.build(S, facade_topo())
    t = facade_topo()
    edges = t.edges + (Edge("web", "db3", "10.214.0.11", "db"),)
    grown = t._replace(edges=edges, shape=Shape(edges))
    b = rules.build(S, grown)
    assert b.jumps == [*a.jumps, jump("10.214.0.11", "db")]


def test_a_topology_keeps_its_shape_while_only_groups_change_targets():
    from fused import plan
    from fused.model import Link
    from fused.store.base import Draft, StoreSnapshot

    links = {("c", f"s{i}"): Link("c", f"s{i}", f"10.214.0.{i + 1}", "t1") for i in range(3)}
    snap = StoreSnapshot(1, links=links, groups={"t1": "t1"})
    topo = plan.topology(snap, "facade")

    def after(edit) -> Topology:
        d = Draft(snap)
        edit(d)
        new = d.after()
        return plan.update_topology(topo, snap, new, plan.delta_names(snap, new))

    moved = after(lambda d: d.put_group("t1", "t2"))  # a move
    assert moved.shape is topo.shape and moved.edges is topo.edges and moved.groups == {"t1": "t2"}
    regrouped = after(lambda d: (d.put_group("t2", "t2"), d.put_link(links[("c", "s0")]._replace(group="t2"))))
    assert regrouped.shape is not topo.shape and regrouped.groups == {"t1": "t1", "t2": "t2"}
    assert after(lambda d: d.put_link(links[("c", "s0")]._replace(facade="10.214.0.9"))).shape is not topo.shape
    assert after(lambda d: d.delete_link("c", "s1")).shape is not topo.shape
    assert after(lambda d: d.put_link(Link("c", "s9", "10.214.0.9", "t1"))).shape is not topo.shape


def test_a_group_no_link_is_in_goes_with_its_last_link():
    from fused.model import Link
    from fused.store.base import Draft, StoreSnapshot

    snap = StoreSnapshot(1, links={("c", "a"): Link("c", "a", None, "t1"), ("c", "b"): Link("c", "b", None, "t1")},
                         groups={"t1": "t1"})
    d = Draft(snap)
    d.delete_link("c", "a")
    assert d.change.groups == {}  # b is still in it
    d.delete_link("c", "b")
    assert d.change.groups == {"t1": None} and d.groups() == {}


# --- Docker's firewall: the accepts tether puts into other tools' chains -----
def test_every_rule_set_admits_the_bridge_both_ways():
    """The records the driver writes at the top of another firewall's
    forward chain that would drop the bridge's traffic: in and out, accept."""
    for rs in (rules.build(S), rules.build(S, facade_topo(), PORTS), rules.build(ISO, facade_topo(), PORTS)):
        assert rs.admit == [Rule("ACCEPT", in_iface="tb0", comment="forwarding of its bridge"),
                            Rule("ACCEPT", out_iface="tb0", comment="forwarding of its bridge")]
    assert rules.build(RuleSettings("other0", "10.1.0.0/16", "10.2.0.0/16")).admit[0].in_iface == "other0"


# --- the per-source DNS limit -------------------------------------------------
class _Net:
    bridge, subnet, facade_subnet, isolation = "tb0", "10.213.0.0/16", "10.214.0.0/16", "none"
    gateway = "10.213.0.1"


class _Dns:
    def __init__(self, enabled: bool = True, per_client_qps: int = 500) -> None:
        self.enabled, self.per_client_qps = enabled, per_client_qps


def test_dns_limit_is_twice_the_budget_per_source_on_the_gateway():
    s = RuleSettings.of(_Net(), dns=_Dns(per_client_qps=500))
    assert (s.dns, s.dns_rate) == ("10.213.0.1", 1000)
    assert rules.build(s).chains[("filter", "INPUT")] == [
        Rule("DROP", in_iface="tb0", dst="10.213.0.1/32", proto=proto, dport=53, limit=1000, meter="dns",
             comment="tether dns flood")
        for proto in ("udp", "tcp")
    ]
    # one meter: UDP and TCP from one source share one bucket
    assert {r.meter for r in rules.build(s).chains[("filter", "INPUT")]} == {"dns"}


def test_no_dns_limit_when_dns_is_off_or_not_given():
    for s in (RuleSettings.of(_Net()), RuleSettings.of(_Net(), dns=_Dns(enabled=False))):
        assert (s.dns, s.dns_rate) == (None, 0)
        assert rules.build(s).chains[("filter", "INPUT")] == []


def test_the_dns_limit_never_exceeds_what_hashlimit_takes():
    assert RuleSettings.of(_Net(), dns=_Dns(per_client_qps=1_000_000)).dns_rate == rules.MAX_RATE
    assert RuleSettings.of(_Net(), dns=_Dns(per_client_qps=1)).dns_rate == 2


def test_the_config_s_dns_section_gives_the_limit():
    from fused.config import Config

    cfg = Config()
    s = RuleSettings.of(cfg.network, dns=cfg.dns)
    assert s.dns == str(cfg.network.gateway) and s.dns_rate == 2 * cfg.dns.per_client_qps
    limit = rules.build(s).chains[("filter", "INPUT")]
    assert [r.proto for r in limit] == ["udp", "tcp"] and all(r.in_iface == cfg.network.bridge for r in limit)


def test_a_change_of_links_never_touches_the_dns_limit():
    s = RuleSettings.of(_Net(), dns=_Dns())
    assert ("filter", "INPUT") not in diff(rules.build(s, facade_topo("db"), PORTS), rules.build(s, facade_topo("db2"), PORTS))
