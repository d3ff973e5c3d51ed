"""tether's accepts in other tools' iptables chains (Docker's, mostly).

An accept ends only the chain it is in: a packet goes on through every other
base chain of the forward hook, and one whose policy is DROP drops it. dockerd
sets the iptables FORWARD policy to DROP when it turns forwarding on, and its
users put DROP rules into DOCKER-USER; either cuts tether's links, facades and
host ports reached from containers, whatever tether's own table accepts.

So where such a chain would drop tether's traffic, tether puts its bridge's
traffic (rules.admissions: -i BRIDGE and -o BRIDGE, ACCEPT) at the top of it,
in rules whose comment names its chain prefix ("tether PREFIX: ..."): its
own, one set per daemon, found again by that mark, taken out by teardown.
The same was done before: netavark's iptables driver and LXD's xtables
driver insert their accepts (or their jumps) at the top of FORWARD, and
Docker's and LXD's documentation tell users to add `-I DOCKER-USER -i BRIDGE
-j ACCEPT`.

They are written with the table's own iptables command (iptables-nft for
the nf_tables `ip filter` table, iptables-legacy for the legacy one), never
as native nft rules: a rule iptables-nft did not write makes `iptables -S`
refuse the table (libvirt keeps its nftables rules out of that table for
this reason). Parsing `-S` output is pure (`parse`, `judge`); `Admission`
runs the commands.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import Rule

log = logging.getLogger("tether.firewall")

# the chains whose verdict tether's bridged traffic must get past: the
# built-in FORWARD (its policy) and Docker's DOCKER-USER, which FORWARD jumps
# to first and where Docker's users put their drops
WATCHED = ("FORWARD", "DOCKER-USER")
_DROPS = ("DROP", "REJECT")


@dataclass(frozen=True)
class Backend:
    """One iptables table family: nf_tables (iptables-nft) or the legacy
    x_tables (iptables-legacy), IPv4 or IPv6."""

    kernel: str  # "nft" | "legacy"
    family: str  # "ip" | "ip6"

    @property
    def command(self) -> str:
        return f"{'ip' if self.family == 'ip' else 'ip6'}tables-{self.kernel}"

    def present(self) -> bool:
        """Whether its filter table can hold a chain that drops: the legacy
        one is loaded (asking the command would load it), the nf_tables one
        has a command to ask (listing creates nothing)."""
        if self.kernel == "legacy":
            names = "/proc/net/ip_tables_names" if self.family == "ip" else "/proc/net/ip6_tables_names"
            try:
                if "filter" not in Path(names).read_text().split():
                    return False
            except OSError:
                return False
        return _which(self.command)


BACKENDS = (Backend("nft", "ip"), Backend("nft", "ip6"), Backend("legacy", "ip"), Backend("legacy", "ip6"))


def _which(cmd: str) -> bool:
    return any(os.access(os.path.join(d, cmd), os.X_OK) for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"))


@dataclass(frozen=True)
class Chain:
    """A chain as `iptables -S` (or -save) lists it."""

    name: str
    policy: str | None  # built-in chains: ACCEPT | DROP
    rules: tuple[tuple[str, ...], ...]  # each rule's arguments after `-A NAME`


def parse(listing: str) -> dict[str, Chain]:
    """The chains of one table from `iptables -t filter -S` (or
    iptables-save) output."""
    policy: dict[str, str | None] = {}
    rules: dict[str, list[tuple[str, ...]]] = {}
    for line in listing.splitlines():
        if line.startswith("-P "):
            _, name, pol = line.split()[:3]
            policy[name] = pol
        elif line.startswith(":"):  # save format: ":FORWARD DROP [0:0]", ":DOCKER - [0:0]"
            name, pol = line[1:].split()[:2]
            policy[name] = None if pol == "-" else pol
        elif line.startswith("-N "):
            policy.setdefault(line.split()[1], None)
        elif line.startswith("-A "):
            # iptables quotes a comment with "..." and escapes a ' in it too
            words = [w.replace("\\'", "'") for w in shlex.split(line)]
            rules.setdefault(words[1], []).append(tuple(words[2:]))
            policy.setdefault(words[1], None)
    return {name: Chain(name, pol, tuple(rules.get(name, ()))) for name, pol in policy.items()}


def target(rule: tuple[str, ...]) -> str | None:
    for flag in ("-j", "-g"):
        if flag in rule:
            i = rule.index(flag)
            return rule[i + 1] if i + 1 < len(rule) else None
    return None


def comment(rule: tuple[str, ...]) -> str | None:
    if "--comment" in rule:
        i = rule.index("--comment")
        return rule[i + 1] if i + 1 < len(rule) else None
    return None


def args(rule: Rule, mark: str) -> tuple[str, ...]:
    """An admission record as iptables arguments, in the order `-S` lists
    them (so a listed rule compares equal to the one tether wants)."""
    out: list[str] = []
    if rule.in_iface:
        out += ["-i", rule.in_iface]
    if rule.out_iface:
        out += ["-o", rule.out_iface]
    return (*out, "-m", "comment", "--comment", mark, "-j", rule.target)


@dataclass(frozen=True)
class Finding:
    """What one watched chain does to tether's traffic, and what of tether's
    accepts it holds."""

    where: str  # "iptables-nft FORWARD"
    chain: str
    drops: str | None  # why it would drop tether's traffic; None: it lets it through
    ours: tuple[tuple[str, ...], ...]  # tether's rules in it, in order
    right: bool  # it holds exactly the wanted ones, before its first DROP/REJECT rule

    @property
    def broken(self) -> bool:
        """tether's traffic is dropped here."""
        return self.drops is not None and not self.right


def judge(where: str, chain: Chain, want: list[tuple[str, ...]] | None, mark: str) -> Finding:
    """Whether `chain` would drop tether's traffic (its policy is DROP, or a
    rule of its drops or rejects: its matches are not looked into, so one
    that spares tether's bridge counts too) and whether tether's accepts
    (`want`; None: any two of its mark) come before that."""
    first_drop = next((i for i, r in enumerate(chain.rules) if target(r) in _DROPS), None)
    if chain.policy == "DROP":
        drops = "policy DROP"
    elif first_drop is not None:
        drops = f"`-A {chain.name} {shlex.join(chain.rules[first_drop])}`"
    else:
        drops = None
    at = [i for i, r in enumerate(chain.rules) if (comment(r) or "").startswith(mark)]
    ours = tuple(chain.rules[i] for i in at)
    right = (list(ours) == want if want is not None else len(ours) >= 2) and \
        (first_drop is None or not at or max(at) < first_drop)
    return Finding(f"{where} {chain.name}", chain.name, drops, ours, right)


def quote(word: str) -> str:
    """A word for iptables-restore, which splits on spaces outside double quotes."""
    return f'"{word}"' if not word or any(c.isspace() for c in word) else word


def rewrite(chain: str, ours: tuple[tuple[str, ...], ...], want: list[tuple[str, ...]]) -> list[str]:
    """iptables-restore lines (filter table, --noflush) that take tether's
    rules out of `chain` and put `want` at its top, in one transaction."""
    lines = [f"-D {chain} " + " ".join(quote(w) for w in r) for r in ours]
    lines += [f"-I {chain} {n} " + " ".join(quote(w) for w in r) for n, r in enumerate(want, 1)]
    return lines


class Admission:
    """tether's accepts in other tools' iptables chains, for one prefix."""

    def __init__(self, prefix: str, rules: list[Rule] = ()) -> None:
        self.prefix = prefix
        self.mark = f"tether {prefix}:"  # every rule of ours has a comment starting so
        self.rules = list(rules)
        self._gen: int | None = None  # the nf_tables generation our last look saw
        self._failed: str | None = None  # the last write that failed, logged once

    @property
    def bridge(self) -> str | None:
        return next((r.in_iface for r in self.rules if r.in_iface), None)

    def want(self) -> list[tuple[str, ...]] | None:
        if not self.rules:
            return None
        return [args(r, f"{self.mark} {r.comment}") for r in self.rules]

    # --- reading --------------------------------------------------------------
    def _listing(self, backend: Backend) -> str | None:
        try:
            p = subprocess.run([backend.command, "-w", "-t", "filter", "-S"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.stdout if p.returncode == 0 else None

    def survey(self, backends: tuple[Backend, ...] = BACKENDS,
               known: dict[Backend, str] | None = None) -> list[tuple[Backend, Finding]]:
        """Every watched chain of every present backend, judged. `known`: a
        backend's filter table as the caller just listed it (-S or -save)."""
        out = []
        want = self.want()
        for b in backends:
            listing = (known or {}).get(b)
            if listing is None and b.present():
                listing = self._listing(b)
            if listing is None:
                continue
            chains = parse(listing)
            out += [(b, judge(b.command, chains[name], want, self.mark)) for name in WATCHED if name in chains]
        return out

    @staticmethod
    def _generation() -> int | None:
        """The nf_tables ruleset generation: any commit by anyone raises it
        (one netlink round trip, no fork); None when it cannot be read."""
        from .nftables import generation

        try:
            return generation()
        except OSError:
            return None

    def advance(self, before: int | None, after: int | None) -> None:
        """The nf_tables generation went from `before` to `after` by the
        caller's own commit (one step): nobody else wrote in between, so our
        last look still holds."""
        if before is not None and after == before + 1 and self._gen == before:
            self._gen = after

    # --- writing --------------------------------------------------------------
    def ensure(self, force: bool = False, known: dict[Backend, str] | None = None) -> list[str]:
        """Put tether's accepts at the top of each watched chain that would
        drop its traffic and lacks them (or holds them after a drop); returns
        what it wrote, one line each. The nf_tables tables are read only when
        their generation moved (or `force`); the legacy ones every time (no
        generation tells a change there)."""
        want = self.want()
        if want is None:
            return []
        seen = self._generation()  # before the look: a change during it is seen next time
        changed = force or seen is None or seen != self._gen
        backends = tuple(b for b in BACKENDS if b.kernel == "legacy" or changed)
        wrote = []
        for b, f in self.survey(backends, known):
            if not f.broken:
                continue
            script = "*filter\n" + "\n".join(rewrite(f.chain, f.ours, want)) + "\nCOMMIT\n"
            p = subprocess.run([f"{b.command}-restore", "-w", "--noflush"], input=script, capture_output=True, text=True,
                               timeout=10)
            if p.returncode != 0:
                why = f"could not accept {self.bridge}'s traffic in {f.where} ({f.drops}): " \
                      f"{' '.join(p.stderr.split()) or p.returncode}"
                if why != self._failed:  # once, not every second
                    log.warning("firewall: %s", why)
                self._failed = why
                continue
            self._failed = None
            wrote.append(f"the accepts for {self.bridge} in {f.where} ({f.drops})")
        # after a write of ours, one more look (it confirms what we wrote)
        self._gen = None if wrote else seen
        return wrote

    def missing(self) -> list[str]:
        return [f"the accepts for {self.bridge or 'its bridge'} in {f.where} ({f.drops})"
                for _, f in self.survey() if f.broken]

    def remove(self) -> list[str]:
        """Take every rule of ours out of every chain of every backend."""
        removed = []
        for b in BACKENDS:
            if not b.present():
                continue
            listing = self._listing(b)
            if listing is None:
                continue
            lines = []
            for chain in parse(listing).values():
                ours = tuple(r for r in chain.rules if (comment(r) or "").startswith(self.mark))
                if ours:
                    lines += rewrite(chain.name, ours, [])
                    removed.append(f"{b.command} {chain.name}")
            if lines:
                script = "*filter\n" + "\n".join(lines) + "\nCOMMIT\n"
                subprocess.run([f"{b.command}-restore", "-w", "--noflush"], input=script, capture_output=True, text=True,
                               timeout=10)
        self._gen = None
        return removed

    # --- diagnosis --------------------------------------------------------------
    def check(self) -> tuple[bool, str, str]:
        """(ok, what it found, the fix) for `tether doctor`: not ok when a
        watched chain would drop tether's traffic and tether's accepts are
        not at its top."""
        findings = [(b, f) for b, f in self.survey() if f.drops is not None]
        broken = [(b, f) for b, f in findings if f.broken]
        if broken:
            b, f = broken[0]
            br = self.bridge or "BRIDGE"
            state = "not before its first drop" if f.ours else "missing"
            return (False, f"{f.where} would drop tether's forwarded traffic ({f.drops}) and tether's accepts for "
                    f"{br} there are {state}" + (f" (and {len(broken) - 1} more chain(s))" if len(broken) > 1 else ""),
                    f"tether-fused puts them back within 2 s while it runs (restart it, or see its log when they stay "
                    f"away); by hand: `{b.command} -I {f.chain} -i {br} -j ACCEPT; {b.command} -I {f.chain} -o {br} "
                    f"-j ACCEPT`")
        if not findings:
            return (True, "", "")
        return (True, "accepts its bridge in " + ", ".join(f"{f.where} ({f.drops})" for _, f in findings), "")
