"""The firewall driver interface.

The daemon computes the whole desired content of its own chains from the
store (`RuleSet`) and a driver makes the kernel match it, in one commit per
table, touching only `<prefix>-*` chains and the jumps into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

# (table, hook chain) pairs the daemon owns a chain for, in that table.
HOOKS: tuple[tuple[str, str], ...] = (
    ("nat", "PREROUTING"),
    ("nat", "OUTPUT"),
    ("nat", "POSTROUTING"),
    ("filter", "FORWARD"),
    ("filter", "INPUT"),
)


class Rule(NamedTuple):
    """One rule; fields left None do not match on anything.

    `target`: ACCEPT | DROP | REJECT | MASQUERADE | DNAT | RETURN, or
    "@SUFFIX" for a jump to the daemon's own chain <prefix>-SUFFIX.
    """

    target: str
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    not_out_iface: str | None = None
    not_dst: str | None = None
    proto: str | None = None
    dport: int | None = None
    to: str | None = None  # DNAT destination "ip[:port]"
    dst_local: bool = False  # -m addrtype --dst-type LOCAL
    ctstate: str | None = None  # -m conntrack --ctstate
    not_orig_dst: str | None = None  # -m conntrack ! --ctorigdst: not DNAT'ed from there
    comment: str | None = None
    not_src: str | None = None
    # matches only a source address sending more than `limit` packets a
    # second (a burst of as many), counted in buckets per source address that
    # every rule of the same `meter` shares (nftables: a dynamic set,
    # iptables: -m hashlimit --hashlimit-mode srcip)
    limit: int | None = None
    meter: str | None = None


@dataclass
class RuleSet:
    """Desired content of every chain the daemon owns, as (table, SUFFIX) ->
    rules for <prefix>-SUFFIX. The chains named after a hook (PREROUTING ...)
    are jumped to from that built-in chain; others only from our rules."""

    chains: dict[tuple[str, str], list[Rule]] = field(default_factory=lambda: {h: [] for h in HOOKS})
    # the links' jumps, the first rules of nat PREROUTING: the very same list
    # object while no link's facade or group changes (a move), so a driver
    # may keep what it made of them (None: not known)
    jumps: list[Rule] | None = None
    # what goes into other firewalls' forward chains that would drop the
    # bridge's traffic (Docker's FORWARD policy DROP, a DOCKER-USER that
    # drops): the driver writes these there, marked as its own
    admit: list[Rule] = field(default_factory=list)

    def add(self, table: str, chain: str, rule: Rule) -> None:
        self.chains.setdefault((table, chain), []).append(rule)


class Firewall(Protocol):
    prefix: str

    def setup(self) -> None:
        """Create the base chains and the jumps into them (idempotent)."""

    def apply(self, rules: RuleSet) -> int:
        """Make our chains hold exactly `rules` (creating and deleting chains as
        needed), one commit per changed table; returns the commits made."""

    def teardown(self) -> None:
        """Remove every chain with our prefix and every jump into them."""

    def dump(self) -> dict[tuple[str, str], list[str]]:
        """What the kernel holds in our chains, for tests and doctor."""

    def check(self) -> tuple[bool, str, str]:
        """(ok, what the kernel holds of this prefix, the fix when not ok):
        the driver's own diagnosis, for `tether doctor`."""

    def missing(self) -> list[str]:
        """What of our last write the kernel does not hold (one line each)."""

    def heal(self) -> list[str]:
        """Write our rules again when someone changed them since our last
        write (a flush, a deleted table or chain or jump); returns what was
        missing, [] when nothing was (cheap: called every second)."""


class NullFirewall:
    """driver = "none": the user manages forwarding and NAT themselves."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def setup(self) -> None:
        pass

    def apply(self, rules: RuleSet) -> int:
        return 0

    def teardown(self) -> None:
        pass

    def dump(self) -> dict[tuple[str, str], list[str]]:
        return {}

    def check(self) -> tuple[bool, str, str]:
        return (True, "driver none: tether writes no rules; forwarding and NAT are yours", "")

    def missing(self) -> list[str]:
        return []

    def heal(self) -> list[str]:
        return []
