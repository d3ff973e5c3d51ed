"""DNS answers agree with the hosts file a consumer reads (pure: no socket)."""
from __future__ import annotations

import dns.message
import dns.rdatatype

from fused import render
from fused.dns.answer import Answers
from fused.graph import Node, Topology
from fused.model import PortSpec


def topo(target: str = "db") -> Topology:
    nodes = {
        "web": Node("web", "10.0.0.2", True),
        "db": Node("db", "10.0.0.3", True, (PortSpec(5432, "tcp"),)),
        "db2": Node("db2", "10.0.0.4", True, (PortSpec(5432, "tcp"),)),
    }
    return Topology.of(nodes, [("web", "database", target, "10.1.0.1", target)], "facade")


def a_record(r: Answers, name: str, src: str = "10.0.0.2") -> str | None:
    ans = r.resolve(dns.message.make_query(name, dns.rdatatype.A), src)
    return ans.answer[0][0].address if ans is not None and ans.answer else None


def hosts_address(t: Topology, consumer: str, name: str) -> str | None:
    files, _ = render.render_all(t, "10.0.0.1", True)
    for line in files[consumer].hosts.decode().splitlines():
        addr, *names = line.split()
        if name in names:
            return addr
    return None


def test_a_target_name_on_a_link_line_resolves_like_the_hosts_file():
    r = Answers([], forwarding=False)
    for target in ("db", "db2"):  # before and after `move db db2`
        t = topo(target)
        r.publish(render.dns_data(t))
        for name in ("database", target, "web"):
            assert a_record(r, name) == hosts_address(t, "web", name), (target, name)
        assert a_record(r, target) == "10.1.0.1"  # the facade, as on the hosts line
    # db left web's hosts file with the move: its own address again, as for anyone
    assert a_record(r, "db") == "10.0.0.3"
    # another container sees db by its own address (no link)
    assert a_record(r, "db2", src="10.0.0.3") == "10.0.0.4"


def test_the_first_hosts_line_naming_a_target_wins():
    nodes = {"web": Node("web", "10.0.0.2", True), "db": Node("db", "10.0.0.3", True)}
    t = Topology.of(nodes, [("web", "zeta", "db", "10.1.0.9", "db"), ("web", "alpha", "db", "10.1.0.5", "db#1")], "facade")
    r = Answers([], forwarding=False)
    r.publish(render.dns_data(t))
    assert a_record(r, "db") == hosts_address(t, "web", "db") == "10.1.0.5"
