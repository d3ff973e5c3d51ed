"""The nftables driver's transactions, without a kernel: what a table holds
for a RuleSet (rules.build's), and what a move or a retarget writes."""
from __future__ import annotations

from fused import rules
from fused.graph import Node, Shape, Topology
from fused.model import PortSpec
from fused.net.firewall.nftables import Desired, NftablesFirewall, rule_text
from fused.net.firewall.base import Rule
from fused.rules import PortForward, group_chain

S = rules.RuleSettings(bridge="tb0", subnet="10.213.0.0/16", facade_subnet="10.214.0.0/16")
PORTS = [PortForward(40000, "tcp", "10.213.0.3", 5432)]


def topo(n: int, target: str = "db") -> Topology:
    nodes = {"db": Node("db", "10.213.0.3", True), "db2": Node("db2", "10.213.0.4", True)}
    nodes |= {f"c{i}": Node(f"c{i}", None, True) for i in range(n)}
    links = [(f"c{i}", "db", target, f"10.214.{i // 250}.{i % 250 + 1}", "db") for i in range(n)]
    return Topology.of(nodes, links, "facade")


def script(before, after) -> list[str]:
    fw = NftablesFirewall.__new__(NftablesFirewall)
    fw.table = "inet T"
    return fw._diff(Desired(before), Desired(after)).splitlines()


def test_links_and_ports_are_map_elements_and_groups_are_chains():
    d = Desired(rules.build(S, topo(3), PORTS))
    assert d.links == {f"10.214.0.{i}": f"goto {group_chain('db')}" for i in (1, 2, 3)}
    assert d.ports == {"tcp . 40000": "10.213.0.3 . 5432"}
    assert d.chains[group_chain("db")] == ('dnat ip to 10.213.0.3 comment "tether group db"',)
    assert d.chains["prerouting"] == (
        'iifname "tb0" ip daddr vmap @links',
        "fib daddr type local dnat ip to meta l4proto . th dport map @ports",
    )


def test_a_move_of_1000_links_is_one_chain_rewritten():
    lines = script(rules.build(S, topo(1000)), rules.build(S, topo(1000, "db2")))
    assert lines == [f"flush chain inet T {group_chain('db')}",
                     f'add rule inet T {group_chain("db")} dnat ip to 10.213.0.4 comment "tether group db"']


def test_a_retarget_of_one_link_is_one_element_and_a_new_group_chain():
    before = topo(3)
    edges = list(before.edges)
    edges[1] = edges[1]._replace(group="db2")
    after = before._replace(edges=tuple(edges), groups={"db": "db", "db2": "db2"}, shape=Shape(tuple(edges)))
    lines = script(rules.build(S, before), rules.build(S, after))
    g2 = group_chain("db2")
    assert lines == [f"add chain inet T {g2}", f'add rule inet T {g2} dnat ip to 10.213.0.4 comment "tether group db2"',
                     "delete element inet T links { 10.214.0.2 }", f"add element inet T links {{ 10.214.0.2 : goto {g2} }}"]


def test_a_dropped_group_goes_after_the_elements_that_jump_to_it():
    lines = script(rules.build(S, topo(2)), rules.build(S, topo(0)))
    g = group_chain("db")
    assert lines[-2:] == [f"flush chain inet T {g}", f"delete chain inet T {g}"]
    assert lines.index(f"delete chain inet T {g}") > lines.index("delete element inet T links { 10.214.0.1, 10.214.0.2 }")


def test_nothing_changed_writes_nothing():
    rs = rules.build(S, topo(5), PORTS)
    assert script(rs, rules.build(S, topo(5), PORTS)) == []


def test_generic_rules_in_nft_words():
    assert rule_text(Rule("MASQUERADE", src="10.0.0.0/8", not_out_iface="br")) == 'oifname != "br" ip saddr 10.0.0.0/8 masquerade'
    assert rule_text(Rule("MASQUERADE", out_iface="br", ctstate="DNAT")) == 'oifname "br" ct status dnat masquerade'
    assert rule_text(Rule("REJECT", dst="10.214.0.0/16", comment='a "b"')) == 'ip daddr 10.214.0.0/16 reject comment "a b"'
    assert rule_text(Rule("DNAT", proto="udp", dport=53, dst_local=True, to="1.2.3.4:53")) == \
        "udp dport 53 fib daddr type local dnat ip to 1.2.3.4:53"


ISO = rules.RuleSettings(bridge="tb0", subnet="10.213.0.0/16", facade_subnet="10.214.0.0/16", isolation="links")


def iso_topo(target: str = "db") -> Topology:
    nodes = {n: Node(n, ip, True, (PortSpec(5432, "tcp"),)) for n, ip in
             (("db", "10.213.0.3"), ("db2", "10.213.0.4"), ("web", "10.213.0.2"))}
    return Topology.of(nodes, [("web", "database", target, "10.214.0.1", target)], "facade")


def test_isolation_tuples_are_set_elements_looked_up_before_the_reject():
    d = Desired(rules.build(ISO, iso_topo(), PORTS))
    assert d.allowed == {"10.213.0.2 . 10.213.0.3 . tcp . 5432": ""}
    assert d.pairs == {"10.213.0.2 . 10.213.0.3": "", "10.213.0.3 . 10.213.0.2": ""}
    assert d.chains["ISOLATE"] == (
        'ct state established,related accept comment "tether isolation: replies"',
        'ct status dnat ct original ip daddr != 10.214.0.0/16 accept comment "tether isolation: published ports"',
        "ip saddr . ip daddr . meta l4proto . th dport @allowed accept",
        "meta l4proto icmp ip saddr . ip daddr @pairs accept",
        'reject comment "tether isolation: no link"',
    )
    assert 'iifname "tb0" oifname "tb0" goto ISOLATE' in d.chains["forward"]


def test_a_retarget_with_isolation_is_elements_in_the_same_transaction():
    lines = script(rules.build(ISO, iso_topo()), rules.build(ISO, iso_topo("db2")))
    assert not [ln for ln in lines if "ISOLATE" in ln or "forward" in ln]  # no rule of the isolation rewritten
    assert "delete element inet T allowed { 10.213.0.2 . 10.213.0.3 . tcp . 5432 }" in lines
    assert "add element inet T allowed { 10.213.0.2 . 10.213.0.4 . tcp . 5432 }" in lines
    assert any(ln.startswith("add element inet T links") for ln in lines)


def test_a_move_within_one_shape_reuses_the_link_elements():
    """A move keeps the topology's shape: the thousand @links elements are the
    very same dict (not made again, not compared), and the script is still the
    group's one rule; a Desired after another shape has its own elements."""
    a_topo = topo(1000)
    a = Desired(rules.build(S, a_topo, PORTS))
    b = Desired(rules.build(S, a_topo._replace(groups={"db": "db2"}), PORTS))
    assert b.links is a.links and len(a.links) == 1000 and b.ports == a.ports
    fw = NftablesFirewall.__new__(NftablesFirewall)
    fw.table = "inet T"
    assert fw._diff(a, b).splitlines() == [f"flush chain inet T {group_chain('db')}",
                                           f'add rule inet T {group_chain("db")} dnat ip to 10.213.0.4 comment "tether group db"']
    c = Desired(rules.build(S, topo(999), PORTS))
    assert c.links is not a.links and len(c.links) == 999 and len(a.links) == 1000


# --- the per-source DNS limit ---------------------------------------------------
DNS = rules.RuleSettings(bridge="tb0", subnet="10.213.0.0/16", facade_subnet="10.214.0.0/16", dns="10.213.0.1",
                         dns_rate=1000)


def test_the_dns_limit_is_a_meter_in_the_input_chain():
    d = Desired(rules.build(DNS, topo(2), PORTS))
    assert d.meters == ("meter_dns",)
    assert d.chains["input"] == tuple(
        f'iifname "tb0" ip daddr 10.213.0.1/32 {p} dport 53 update @meter_dns {{ ip saddr limit rate over 1000/second '
        f'burst 1000 packets }} counter drop comment "tether dns flood"' for p in ("udp", "tcp"))
    assert Desired(rules.build(S, topo(2), PORTS)).chains["input"] == () and Desired(rules.build(S)).meters == ()


def test_the_whole_table_declares_the_meter_before_the_rules_that_update_it():
    fw = NftablesFirewall.__new__(NftablesFirewall)
    fw.table = "inet T"
    lines = fw._full(Desired(rules.build(DNS, topo(1), PORTS))).splitlines()
    declared = lines.index("add set inet T meter_dns { type ipv4_addr ; flags dynamic,timeout ; timeout 10s ; size 65536 ; }")
    assert declared < min(i for i, ln in enumerate(lines) if "@meter_dns" in ln)
    assert "add chain inet T input { type filter hook input priority filter; policy accept; }" in lines


def test_a_move_with_the_dns_limit_is_still_one_chain_rewritten():
    lines = script(rules.build(DNS, topo(100)), rules.build(DNS, topo(100, "db2")))
    assert lines == [f"flush chain inet T {group_chain('db')}",
                     f'add rule inet T {group_chain("db")} dnat ip to 10.213.0.4 comment "tether group db"']


def test_drop_in_nft_words():
    assert rule_text(Rule("DROP", proto="udp", dport=53, limit=7, meter="x")) == \
        "udp dport 53 update @meter_x { ip saddr limit rate over 7/second burst 7 packets } counter drop"
