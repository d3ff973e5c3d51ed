"""python-iptables driver.

python-iptables writes the legacy x_tables (`iptables-legacy -S` shows them;
Debian's default `iptables` is the nft backend and does not). Each `apply`
rewrites only the chains whose desired content changed, in one commit per
table.
"""
from __future__ import annotations

import iptc
import iptc.easy

from .base import HOOKS, Rule, RuleSet

_TABLES = {"nat": iptc.Table.NAT, "filter": iptc.Table.FILTER}


def _table(name: str) -> iptc.Table:
    t = iptc.Table(_TABLES[name])
    t.refresh()
    return t


def to_iptc(rule: Rule) -> iptc.Rule:
    r = iptc.Rule()
    if rule.src:
        r.src = rule.src
    if rule.dst:
        r.dst = rule.dst
    elif rule.not_dst:
        r.dst = "!" + rule.not_dst
    if rule.in_iface:
        r.in_interface = rule.in_iface
    if rule.out_iface:
        r.out_interface = rule.out_iface
    elif rule.not_out_iface:
        r.out_interface = "!" + rule.not_out_iface
    if rule.proto:
        r.protocol = rule.proto
        if rule.dport is not None:
            m = r.create_match(rule.proto)
            m.dport = str(rule.dport)
    if rule.dst_local:
        m = r.create_match("addrtype")
        m.dst_type = "LOCAL"
    if rule.comment:
        m = r.create_match("comment")
        m.comment = rule.comment[:255]
    t = r.create_target(rule.target)
    if rule.target == "DNAT" and rule.to:
        t.to_destination = rule.to
    return r


class IptablesFirewall:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._applied: dict[tuple[str, str], list[Rule]] = {}

    def chain(self, hook: str) -> str:
        return f"{self.prefix}-{hook}"

    def setup(self) -> None:
        for tname in {t for t, _ in HOOKS}:
            table = _table(tname)
            table.autocommit = False
            for t, hook in HOOKS:
                if t != tname:
                    continue
                name = self.chain(hook)
                if not table.is_chain(name):
                    table.create_chain(name)
                builtin = iptc.Chain(table, hook)
                if not any(r.target.name == name for r in builtin.rules):
                    jump = iptc.Rule()
                    jump.create_target(name)
                    builtin.insert_rule(jump)
            table.commit()
            table.autocommit = True
        self._applied = {}

    def apply(self, rules: RuleSet) -> int:
        commits = 0
        for tname in sorted({t for t, _ in HOOKS}):
            changed = [
                (hook, rs)
                for (t, hook), rs in sorted(rules.chains.items())
                if t == tname and self._applied.get((t, hook)) != rs
            ]
            if not changed:
                continue
            table = _table(tname)
            table.autocommit = False
            try:
                for hook, rs in changed:
                    chain = iptc.Chain(table, self.chain(hook))
                    chain.flush()
                    for rule in rs:
                        chain.append_rule(to_iptc(rule))
                table.commit()
            finally:
                table.autocommit = True
            commits += 1
            for hook, rs in changed:
                self._applied[(tname, hook)] = list(rs)
        return commits

    def teardown(self) -> None:
        mine = self.prefix + "-"
        for tname in _TABLES:
            table = _table(tname)
            table.autocommit = False
            try:
                for chain in table.chains:
                    if chain.is_builtin():
                        for r in list(chain.rules):
                            if r.target.name.startswith(mine):
                                chain.delete_rule(r)
                ours = [c for c in table.chains if c.name.startswith(mine)]
                for chain in ours:
                    chain.flush()
                for chain in ours:
                    table.delete_chain(chain.name)
                table.commit()
            finally:
                table.autocommit = True
        self._applied = {}

    def dump(self) -> dict[tuple[str, str], list[str]]:
        out: dict[tuple[str, str], list[str]] = {}
        mine = self.prefix + "-"
        for tname in _TABLES:
            for chain in _table(tname).chains:
                if chain.name.startswith(mine):
                    out[(tname, chain.name)] = [str(iptc.easy.decode_iptc_rule(r)) for r in chain.rules]
        return out
