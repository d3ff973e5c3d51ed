"""Pure: the firewall rules the daemon wants, computed from config and state."""
from __future__ import annotations

from .config import Config
from .net.firewall.base import Rule, RuleSet


def build(cfg: Config) -> RuleSet:
    net = cfg.network
    rs = RuleSet()
    # containers reach the outside through the host's address
    rs.add("nat", "POSTROUTING", Rule("MASQUERADE", src=net.subnet, not_out_iface=net.bridge, comment="tether masquerade"))
    # forwarding to and from the bridge (also between containers when bridged
    # traffic passes netfilter)
    rs.add("filter", "FORWARD", Rule("ACCEPT", in_iface=net.bridge, comment="tether from bridge"))
    rs.add("filter", "FORWARD", Rule("ACCEPT", out_iface=net.bridge, comment="tether to bridge"))
    return rs
