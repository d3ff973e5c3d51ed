"""Firewall drivers behind one small interface (base.Firewall)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ...errors import FirewallError
from .base import Firewall, NullFirewall, Rule, RuleSet


def choose(driver: str) -> str:
    """The driver `driver` means here: "auto" is nftables where libnftables
    works, else iptables."""
    if driver != "auto":
        return driver
    from . import nftables

    return "nftables" if nftables.available() is None else "iptables"


def make(driver: str, prefix: str, bridge: str | None = None) -> Firewall:
    """The driver for [firewall] driver; FirewallError (one line, with the
    fix) when it cannot work here. `bridge`: the one whose traffic it lets
    through other tools' chains (Docker's) before its first apply names it
    (doctor's check)."""
    driver = choose(driver)
    admit: list[Rule] = []
    if bridge:
        from ...rules import admissions  # not at the top: rules imports this package

        admit = admissions(bridge)
    if driver == "nftables":
        from . import nftables

        problem = nftables.available()
        if problem is not None:
            raise FirewallError(
                f"firewall driver nftables does not work here: {problem}; "
                'install nftables, or set driver = "iptables" (or "auto") in [firewall]'
            )
        return nftables.NftablesFirewall(prefix, admit)
    if driver == "iptables":
        try:
            from .iptables import IptablesFirewall
        except Exception as e:  # noqa: BLE001 - libiptc missing or broken: say so in one line
            raise FirewallError(
                f"firewall driver iptables does not work here ({type(e).__name__}: {e}); "
                'install iptables (apt-get install iptables), or set driver = "nftables" in [firewall]'
            ) from None
        return IptablesFirewall(prefix, admit)
    if driver == "none":
        return NullFirewall(prefix)
    raise FirewallError(f"unknown firewall driver {driver!r}: use auto, nftables, iptables or none")


def _legacy_chains(prefix: str) -> bool:
    """Whether the legacy x_tables may hold chains of `prefix`, found without
    loading python-iptables: libiptc and its extensions would stay in the
    daemon for its whole life (9 MiB of RSS) just to find nothing."""
    try:
        if not Path("/proc/net/ip_tables_names").read_text().split():
            return False  # no legacy table is even loaded
    except OSError:
        return False
    save = shutil.which("iptables-legacy-save")
    if save is None:
        return True  # cannot tell without libiptc
    out = subprocess.run([save], capture_output=True, text=True).stdout
    return any(line.startswith(f":{prefix}-") for line in out.splitlines())


def remove_others(driver: str, prefix: str) -> list[str]:
    """Remove what another driver wrote under `prefix` (an upgrade that
    switched the driver, e.g. to "auto" = nftables): its DNATs would go on
    answering for the old targets. Returns what was removed."""
    driver = choose(driver)
    out = []
    if driver != "nftables":
        from . import nftables

        if nftables.available() is None and nftables.NftablesFirewall(prefix).exists():
            nftables.NftablesFirewall(prefix).teardown()
            out.append(f"nftables table inet {prefix}")
    if driver != "iptables" and _legacy_chains(prefix):
        try:
            from .iptables import IptablesFirewall
        except Exception:  # noqa: BLE001 - no libiptc: nothing of it can exist
            return out
        fw = IptablesFirewall(prefix)
        if fw.dump():
            fw.teardown()
            out.append(f"iptables chains {prefix}-*")
    return out


__all__ = ["Firewall", "FirewallError", "NullFirewall", "Rule", "RuleSet", "choose", "make", "remove_others"]
