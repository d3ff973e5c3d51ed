"""python-iptables driver.

python-iptables writes the legacy x_tables (`iptables-legacy -S` shows them;
Debian's default `iptables` is the nft backend and does not). `apply` edits
only what changed, rule by rule, and commits each changed table once: libiptc
rewrites a whole table per commit (cheap in C), while building a rule object
in Python is the expensive part (~0.7 ms), so a retarget among 1000 links
touches one rule, not 1000.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import warnings


def _import_iptc():
    """python-iptables imports distutils.sysconfig; in a venv, setuptools'
    import shim answers that with setuptools and pkg_resources (11 MiB of the
    daemon's RSS). Without the shim it gets the standard library's distutils
    (or, on Python 3.12+, none, and falls back to sysconfig): same result."""
    shims = [f for f in sys.meta_path if type(f).__module__ == "_distutils_hack"]
    for f in shims:
        sys.meta_path.remove(f)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import iptc
            import iptc.easy
    finally:
        sys.meta_path[0:0] = shims
    return iptc


iptc = _import_iptc()

from .base import HOOKS, Rule, RuleSet
from .foreign import Admission, Backend

_TABLES = {"nat": iptc.Table.NAT, "filter": iptc.Table.FILTER}
_HOOK_NAMES = {h for _, h in HOOKS}


log = logging.getLogger("tether.firewall")

XTABLES_LOCK = "/run/xtables.lock"
_LEGACY = Backend("legacy", "ip")


@contextlib.contextmanager
def xtables_lock():
    """The lock iptables(-legacy) itself takes: libiptc reads a whole table,
    edits it and writes it back, so two writers without it lose each other's
    changes (two tether daemons side by side did)."""
    fd = os.open(XTABLES_LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _table(name: str) -> iptc.Table:
    """A fresh view of a table. Never autocommit: python-iptables caches one
    Table per name, and refreshing an autocommit table first commits its old
    handle, writing back a stale copy over other tools' changes."""
    t = iptc.Table(_TABLES[name], autocommit=False)
    t.refresh()
    return t


class IptablesFirewall:
    def __init__(self, prefix: str, admit: list[Rule] = ()) -> None:
        self.prefix = prefix
        # what we last wrote, per table: {chain suffix: rules}; None: unknown
        # (after setup), so the next apply rebuilds that table's chains
        self._applied: dict[str, dict[str, list[Rule]] | None] = {t: None for t in _TABLES}
        # our accepts in iptables chains that would drop the bridge's traffic
        # (Docker's, nf_tables or legacy): `admit` until an apply brings rules.build's
        self.admission = Admission(prefix, list(admit))

    def chain(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def meter(self, name: str | None) -> str:
        """A hashlimit table's name (at most 15 characters: it is a file in
        /proc/net/ipt_hashlimit), this prefix's own."""
        name = name or "default"
        full = f"{self.prefix}-{name}"
        if len(full) <= 15:
            return full
        return f"t{hashlib.sha1(self.prefix.encode()).hexdigest()[:13 - len(name)]}-{name}"

    def to_iptc(self, rule: Rule) -> iptc.Rule:
        r = iptc.Rule()
        if rule.src:
            r.src = rule.src
        elif rule.not_src:
            r.src = "!" + rule.not_src
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
        if rule.ctstate or rule.not_orig_dst:
            m = r.create_match("conntrack")
            if rule.ctstate:
                m.ctstate = rule.ctstate
            if rule.not_orig_dst:
                m.ctorigdst = "!" + rule.not_orig_dst
        if rule.limit:
            # one bucket per source address, shared by the rules of the meter
            m = r.create_match("hashlimit")
            m.hashlimit_above = f"{rule.limit}/sec"
            m.hashlimit_burst = str(rule.limit)
            m.hashlimit_mode = "srcip"
            m.hashlimit_name = self.meter(rule.meter)
            # what iptables' own parser fills in and libiptc does not: the
            # kernel refuses a table without them (EINVAL)
            m.hashlimit_htable_expire = "10000"
            m.hashlimit_htable_gcinterval = "1000"
        if rule.comment:
            m = r.create_match("comment")
            m.comment = rule.comment[:255]
        target = self.chain(rule.target[1:]) if rule.target.startswith("@") else rule.target
        t = r.create_target(target)
        if rule.target == "DNAT" and rule.to:
            t.to_destination = rule.to
        return r

    def setup(self) -> None:
        for tname in _TABLES:
            with xtables_lock():
                self._setup_table(tname)
        self._applied = {t: None for t in _TABLES}

    def _setup_table(self, tname: str) -> None:
        table = _table(tname)
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

    def apply(self, rules: RuleSet) -> int:
        commits = 0
        if rules.admit:
            self.admission.rules = list(rules.admit)
        fresh = self._applied["filter"] is None
        for tname in _TABLES:
            want = {suffix: rs for (t, suffix), rs in rules.chains.items() if t == tname}
            for t, hook in HOOKS:
                if t == tname:
                    want.setdefault(hook, [])
            have = self._applied[tname]
            if have is not None and have == want:
                continue
            with xtables_lock():
                try:
                    self._apply_table(tname, have, want)
                except iptc.IPTCError as e:
                    if have is None:
                        raise
                    # the kernel no longer holds what we wrote (someone flushed
                    # or edited our chains): our chains and jumps, whole, again
                    log.warning("firewall: %s table differs from tether's last write (%s): rewriting its chains", tname, e)
                    self._setup_table(tname)
                    self._apply_table(tname, None, want)
            commits += 1
            self._applied[tname] = {k: list(v) for k, v in want.items()}
        if fresh:  # the first apply (start): other tools' chains, too
            self.admission.ensure(force=True)
        return commits

    def _apply_table(self, tname: str, have: dict[str, list[Rule]] | None, want: dict[str, list[Rule]]) -> None:
        table = _table(tname)
        try:
            if have is None:
                have = self._rebuild_base(table)
            for suffix in want:
                if suffix not in have and not table.is_chain(self.chain(suffix)):
                    table.create_chain(self.chain(suffix))
            for suffix, rs in want.items():
                self._edit(iptc.Chain(table, self.chain(suffix)), have.get(suffix, []), rs)
            for suffix in have:
                if suffix not in want:
                    iptc.Chain(table, self.chain(suffix)).flush()
            for suffix in have:
                if suffix not in want and suffix not in _HOOK_NAMES:
                    table.delete_chain(self.chain(suffix))
            table.commit()
        except Exception:
            self._applied[tname] = None  # the kernel keeps its old state; rebuild next time
            raise

    def _rebuild_base(self, table: iptc.Table) -> dict[str, list[Rule]]:
        """State unknown: empty every chain of ours (kept: they may be
        referenced), so edits start from nothing. Returns what now exists."""
        mine = self.prefix + "-"
        have = {}
        for chain in table.chains:
            if chain.name.startswith(mine):
                chain.flush()
                have[chain.name[len(mine) :]] = []
        return have

    def _edit(self, chain: iptc.Chain, old: list[Rule], new: list[Rule]) -> None:
        """Turn `old` into `new` touching only the differing middle part."""
        if old == new:
            return
        p = 0
        while p < len(old) and p < len(new) and old[p] == new[p]:
            p += 1
        s = 0
        while s < len(old) - p and s < len(new) - p and old[-1 - s] == new[-1 - s]:
            s += 1
        old_mid, new_mid = old[p : len(old) - s], new[p : len(new) - s]
        common = min(len(old_mid), len(new_mid))
        for i in range(common):  # same position, new content
            chain.replace_rule(self.to_iptc(new_mid[i]), p + i)
        for i in range(len(old_mid) - 1, common - 1, -1):  # surplus old rules
            chain.delete_rule(self.to_iptc(old_mid[i]))
        for i in range(common, len(new_mid)):  # extra new rules
            chain.insert_rule(self.to_iptc(new_mid[i]), p + i)

    def teardown(self) -> None:
        for tname in _TABLES:
            with xtables_lock():
                self._teardown_table(tname)
        self.admission.remove()
        self._applied = {t: None for t in _TABLES}

    def _teardown_table(self, tname: str) -> None:
        mine = self.prefix + "-"
        table = _table(tname)
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

    def missing(self) -> list[str]:
        """What of our last write the kernel does not hold: our chains, their
        rules (counted) and the jumps from the built-in chains, read with
        iptables-legacy-save (one read of each table, no rule objects); our
        accepts in other tools' chains that would drop the bridge's traffic."""
        out = []
        for tname, want in self._applied.items():
            if want is not None:
                out += self._missing_in(tname, want, self._save(tname))
        if self._applied["filter"] is not None:
            out += self.admission.missing()
        return out

    @staticmethod
    def _save(tname: str) -> str:
        return subprocess.run(["iptables-legacy-save", "-t", tname], capture_output=True, text=True, check=True).stdout

    def _missing_in(self, tname: str, want: dict[str, list[Rule]], text: str) -> list[str]:
        mine = self.prefix + "-"
        chains: dict[str, int] = {}
        jumps: set[str] = set()
        for line in text.splitlines():
            if line.startswith(":" + mine):
                chains.setdefault(line[1:].split()[0][len(mine):], 0)
            elif line.startswith("-A "):
                parts = line.split()
                chain = parts[1]
                if chain.startswith(mine):
                    suffix = chain[len(mine):]
                    chains[suffix] = chains.get(suffix, 0) + 1
                elif "-j" in parts and parts[parts.index("-j") + 1] == mine + chain:
                    jumps.add(chain)
        out = []
        for suffix, rules in want.items():
            if suffix not in chains:
                out.append(f"{tname} chain {mine}{suffix}")
            elif chains[suffix] != len(rules):
                out.append(f"{tname} chain {mine}{suffix}: {chains[suffix]} of its {len(rules)} rules")
            if suffix in _HOOK_NAMES and suffix not in jumps:
                out.append(f"{tname} jump from {suffix} to {mine}{suffix}")
        return out

    def heal(self) -> list[str]:
        out = []
        listed: dict[Backend, str] = {}
        for tname, want in self._applied.items():
            if want is None:
                continue
            text = self._save(tname)
            lost = self._missing_in(tname, want, text)
            if lost:
                with xtables_lock():
                    self._setup_table(tname)
                    self._apply_table(tname, None, want)
                out += lost
            elif tname == "filter":
                listed[_LEGACY] = text  # the admission reads the legacy filter table from it, no second read
        if self._applied["filter"] is not None:
            out += self.admission.ensure(known=listed)
        return out

    def check(self) -> tuple[bool, str, str]:
        """(ok, what the kernel holds of us, the fix) for `tether doctor`."""
        missing, nojump, rules = [], [], 0
        tables: dict[str, iptc.Table] = {}
        try:
            for tname, hook in HOOKS:
                t = tables.get(tname)
                if t is None:
                    t = tables[tname] = _table(tname)
                name = self.chain(hook)
                if not t.is_chain(name):
                    missing.append(f"{tname} {name}")
                    continue
                rules += len(iptc.Chain(t, name).rules)
                if not any(r.target.name == name for r in iptc.Chain(t, hook).rules):
                    nojump.append(f"{tname} {hook} -> {name}")
        except iptc.IPTCError as e:
            return (False, f"cannot read the legacy tables: {e}",
                    "`modprobe iptable_nat` (CONFIG_IP_NF_NAT, CONFIG_IP_NF_IPTABLES_LEGACY)")
        finally:
            for t in tables.values():
                t.close()
        fix = ("restart tether-fused: it creates its chains and the jumps into them at start, and within 2 s "
               "of a removal (see them with `iptables-legacy -t nat -S`)")
        if missing:
            return (False, f"chains missing: {', '.join(missing)}", fix)
        if nojump:
            return (False, f"jumps missing (another tool flushed them?): {', '.join(nojump)}", fix)
        ok, admitted, fix = self.admission.check()
        if not ok:
            return (False, admitted, fix)
        return (True, f"{len(HOOKS)} {self.prefix}-* chains with their jumps, {rules} rules (legacy tables: "
                "`iptables-legacy -t nat -S`)" + (f"; it {admitted}" if admitted else ""), "")

    def dump(self) -> dict[tuple[str, str], list[str]]:
        out: dict[tuple[str, str], list[str]] = {}
        mine = self.prefix + "-"
        for tname in _TABLES:
            for chain in _table(tname).chains:
                if chain.name.startswith(mine):
                    out[(tname, chain.name)] = [str(iptc.easy.decode_iptc_rule(r)) for r in chain.rules]
        return out
