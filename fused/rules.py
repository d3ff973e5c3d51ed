"""Pure: the firewall rules the daemon wants, computed from settings and state.

nat <prefix>-PREROUTING   -d FACADE -j <prefix>-G<group>        one per link (facade strategy)
                          -p P --dport H (local dst) -j DNAT IP:PORT   one per published port
nat <prefix>-OUTPUT       the published ports again, for the host itself (127.0.0.1 too)
nat <prefix>-G<group>     -j DNAT --to-destination TARGET_IP        one per link group
nat <prefix>-POSTROUTING  masquerade the subnet leaving elsewhere, and DNAT'ed
                          connections leaving on the bridge (the reply path, see README)
filter <prefix>-FORWARD   reject facade addresses nobody answers; accept the bridge
filter <prefix>-ISOLATE   (isolation = "links") what may pass between two
                          containers: replies, published ports, and each link's
                          consumer -> target on the target's exposed ports
                          (and ICMP); the rest is rejected
filter <prefix>-INPUT     ([dns] enabled) DNS to the gateway from one source
                          address past twice its budget, dropped
admit (other firewalls)   accept the bridge's traffic, both ways, where another
                          tool's forward chain would drop it (see `admissions`)

Links are grouped: a move retargets a whole group by rewriting its one DNAT
rule, however many links it holds.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Protocol

from .graph import Topology
from .net.firewall.base import Rule, RuleSet


class _NetworkSettings(Protocol):
    bridge: str
    subnet: str
    facade_subnet: str
    isolation: str

    @property
    def gateway(self) -> object: ...


class _DnsSettings(Protocol):
    enabled: bool
    per_client_qps: int


# the DNS responder's budget is per_client_qps (REFUSED past it); the kernel
# drops only past twice that, so a client the responder refuses still gets
# its REFUSED answers, while a flood stops before it fills the socket's queue
DNS_KERNEL_FACTOR = 2
# xt_hashlimit's highest rate (packets a second); nftables has no such bound
MAX_RATE = 1_000_000


@dataclass(frozen=True)
class RuleSettings:
    """The settings the rules depend on, and nothing else: no pydantic here,
    and a test builds rules from three strings."""

    bridge: str
    subnet: str  # container addresses (masqueraded)
    facade_subnet: str  # link addresses (rejected when dangling)
    isolation: str = "none"  # "links": containers talk only along links
    # several hosts: a DNAT'ed connection from a container keeps its source
    # (the gateway is on every host: its replies would end on the target's),
    # and its bridged replies pass the consumer host's conntrack
    cluster: bool = False
    # the address DNS answers on (the gateway), and the packets a second one
    # source address may send it before the kernel drops the rest; None / 0:
    # no DNS, no limit
    dns: str | None = None
    dns_rate: int = 0

    @classmethod
    def of(cls, network: _NetworkSettings, cluster: bool = False, dns: _DnsSettings | None = None) -> RuleSettings:
        """From the `[network]` settings (config.NetworkConfig), and `[dns]`
        (config.DnsConfig) for the per-source limit."""
        limited = dns is not None and dns.enabled
        return cls(network.bridge, network.subnet, network.facade_subnet, network.isolation, cluster,
                   dns=str(network.gateway) if limited else None,
                   dns_rate=min(DNS_KERNEL_FACTOR * dns.per_client_qps, MAX_RATE) if limited else 0)


@dataclass(frozen=True, order=True)
class PortForward:
    host_port: int
    proto: str
    ip: str
    port: int


@functools.lru_cache(maxsize=65536)
def group_chain(group: str) -> str:
    """The chain suffix of a link group. 48 bits of hash: with 32, two groups
    among a few tens of thousands share a chain (the groups "c59796" and
    "c67177" do), and the first DNAT in it takes the links of both. A
    12-character prefix, '-' and this make 26 of the 28 characters a chain
    name can have."""
    return "G" + hashlib.sha1(group.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=65536)
def _link_rule(facade: str, group: str, bridge: str) -> Rule:
    return Rule("@" + group_chain(group), dst=f"{facade}/32", in_iface=bridge)


# the last topology shape's groups with a facade link, and its link jumps:
# a move changes no link, so its rules are built without a pass over a
# thousand links; replaced when the shape changes
_last: tuple[object, frozenset[str], tuple, list[Rule]] | None = None


def _members(topo: Topology) -> frozenset[str]:
    """The link groups with a facade."""
    if topo.shape is not None and _last is not None and _last[0] is topo.shape:
        return _last[1]
    return frozenset(e.group for e in topo.edges if e.facade)


def build(settings: RuleSettings, topo: Topology | None = None, ports: list[PortForward] = ()) -> RuleSet:
    global _last
    rs = RuleSet()
    topo = topo or Topology()
    # links (facade strategy): one jump per link into its group's chain
    nodes, edges, groups = topo.nodes, topo.edges, topo.groups
    group_ip: dict[str, str] = {}
    members = _members(topo)
    for g in members:
        t = nodes.get(groups.get(g, ""))
        if t is not None and t.ip:
            group_ip[g] = t.ip
    # in the topology's order (by consumer, then alias): no sort of a
    # thousand rules on every change, and a new link lands next to its
    # consumer's others
    bridge = settings.bridge
    key = (bridge, frozenset(group_ip))
    if topo.shape is not None and _last is not None and _last[0] is topo.shape and _last[2] == key:
        jumps = _last[3]
    else:
        jumps = [_link_rule(e.facade, e.group, bridge) for e in edges if e.facade and e.group in group_ip]
        if topo.shape is not None:
            _last = (topo.shape, members, key, jumps)
    rs.jumps = jumps
    rs.chains[("nat", "PREROUTING")] = list(jumps)
    for g, ip in sorted(group_ip.items()):
        rs.add("nat", group_chain(g), Rule("DNAT", to=ip, comment=f"tether group {g}"))
    # published ports: from elsewhere (PREROUTING) and from the host (OUTPUT)
    for f in sorted(ports):
        dnat = Rule("DNAT", proto=f.proto, dport=f.host_port, dst_local=True, to=f"{f.ip}:{f.port}")
        rs.add("nat", "PREROUTING", dnat)
        rs.add("nat", "OUTPUT", dnat)
    # containers reach the outside through the host's address
    rs.add("nat", "POSTROUTING", Rule("MASQUERADE", src=settings.subnet, not_out_iface=settings.bridge, comment="tether masquerade"))
    # DNAT'ed connections leaving on the bridge (consumer and target on the
    # same bridge; the host's own 127.0.0.1) come from the gateway, so replies
    # return through the host and its conntrack
    rs.add("nat", "POSTROUTING", Rule("MASQUERADE", out_iface=settings.bridge, ctstate="DNAT", comment="tether reply path",
                                      not_src=settings.subnet if settings.cluster else None))
    # a facade address with no target must not leave the host
    rs.add("filter", "FORWARD", Rule("REJECT", dst=settings.facade_subnet, comment="tether dangling link"))
    if settings.isolation == "links":
        # container to container, bridged or routed (a facade's DNAT): the
        # bridge passes its traffic to these hooks (br_netfilter, see wiring)
        rs.add("filter", "FORWARD", Rule("@ISOLATE", in_iface=bridge, out_iface=bridge))
        rs.chains[("filter", "ISOLATE")] = isolation_rules(settings, topo)
    rs.add("filter", "FORWARD", Rule("ACCEPT", in_iface=settings.bridge, comment="tether from bridge"))
    rs.add("filter", "FORWARD", Rule("ACCEPT", out_iface=settings.bridge, comment="tether to bridge"))
    rs.chains[("filter", "INPUT")] = dns_limit(settings)
    rs.admit = admissions(settings.bridge)
    return rs


def dns_limit(settings: RuleSettings) -> list[Rule]:
    """DNS queries to the gateway from one source address past `dns_rate` a
    second, dropped before they reach the responder's socket: a flood from
    one container cannot fill the socket's queue and starve the others. One
    bucket per source for UDP and TCP together (one meter)."""
    if not settings.dns or not settings.dns_rate:
        return []
    return [Rule("DROP", in_iface=settings.bridge, dst=f"{settings.dns}/32", proto=proto, dport=53,
                 limit=settings.dns_rate, meter="dns", comment="tether dns flood")
            for proto in ("udp", "tcp")]


def admissions(bridge: str) -> list[Rule]:
    """The bridge's traffic, from it and to it, accepted: what tether puts at
    the top of another firewall's forward chain that would drop it (Docker's
    iptables FORWARD policy DROP, a DOCKER-USER chain that drops). An accept
    in tether's own table ends only that table's chain; another table's drop
    still drops."""
    return [Rule("ACCEPT", in_iface=bridge, comment="forwarding of its bridge"),
            Rule("ACCEPT", out_iface=bridge, comment="forwarding of its bridge")]


def allowed(topo: Topology) -> list[Rule]:
    """Each link's consumer -> target on the target's exposed ports, and
    ICMP between the two (either way); in the topology's order, each once."""
    out: dict[Rule, None] = {}
    nodes = topo.nodes
    for e in topo.edges:
        c, t = nodes.get(e.consumer), nodes.get(topo.groups.get(e.group, ""))
        if c is None or t is None or not c.ip or not t.ip:
            continue
        for ip in (t.ip, *t.answers):  # and the addresses a move gave it
            for p in t.expose:
                out[_allow(c.ip, ip, p.proto, p.port)] = None
            out[_allow(c.ip, ip, "icmp", None)] = None
            out[_allow(ip, c.ip, "icmp", None)] = None
    return list(out)


@functools.lru_cache(maxsize=65536)
def _allow(src: str, dst: str, proto: str, port: int | None) -> Rule:
    return Rule("ACCEPT", src=src, dst=dst, proto=proto, dport=port)


def isolation_rules(settings: RuleSettings, topo: Topology) -> list[Rule]:
    return [
        Rule("ACCEPT", ctstate="ESTABLISHED,RELATED", comment="tether isolation: replies"),
        # a host port published by a container, reached through a host address
        Rule("ACCEPT", ctstate="DNAT", not_orig_dst=settings.facade_subnet, comment="tether isolation: published ports"),
        *allowed(topo),
        Rule("REJECT", comment="tether isolation: no link"),
    ]
