"""Firewall drivers behind one small interface (base.Firewall)."""
from __future__ import annotations

from .base import Firewall, NullFirewall, Rule, RuleSet


def make(driver: str, prefix: str) -> Firewall:
    if driver == "iptables":
        from .iptables import IptablesFirewall

        return IptablesFirewall(prefix)
    if driver == "none":
        return NullFirewall(prefix)
    raise ValueError(f"firewall driver {driver!r} is not available yet: use iptables or none")


__all__ = ["Firewall", "NullFirewall", "Rule", "RuleSet", "make"]
