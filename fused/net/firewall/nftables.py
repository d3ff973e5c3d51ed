"""nftables driver: one table per daemon, lookups in maps instead of a rule per link.

    table inet <prefix> {
        map links { type ipv4_addr : verdict }       facade -> goto <group chain>
        map ports { type inet_proto . inet_service : ipv4_addr . inet_service }
                                                    (proto, host port) -> address . port
        set allowed { type ipv4_addr . ipv4_addr . inet_proto . inet_service }
                                                    isolation: consumer . target . proto . port
        set pairs { type ipv4_addr . ipv4_addr }    isolation: ICMP between linked pairs
        chain G<hash> { dnat ip to TARGET }         one per link group
        chain prerouting  (nat, dstnat)     iifname BRIDGE ip daddr vmap @links
                                            fib daddr type local dnat ip to meta l4proto . th dport map @ports
        chain output      (nat, -100)       the published ports again, for the host itself
        chain postrouting (nat, srcnat)     masquerade (rules.build's POSTROUTING)
        chain forward     (filter, filter)  dangling facades rejected, the bridge accepted
        chain input       (filter, filter)  DNS to the gateway past a source's rate, dropped
        set meter_dns { type ipv4_addr }    that rate's buckets, one per source address
        chain ISOLATE     (isolation = "links") replies, published ports, @allowed, @pairs; else reject
    }

A move rewrites the one rule of a group chain and a retarget one element of
@links (and, with isolation, of @allowed): neither grows with the number of
links. Every apply is one atomic
transaction through libnftables (the library `nft` itself is; in process, so
no fork per change, like kube-proxy's knftables feeding `nft -f -`): the
difference from the last write when the kernel still holds it, else (the
difference failed, or nothing was written yet) the whole table replaced.
"""
from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import threading

from .base import Rule, RuleSet
from .foreign import Admission

_BASE = {
    ("nat", "PREROUTING"): ("prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
    ("nat", "OUTPUT"): ("output", "type nat hook output priority -100; policy accept;"),
    ("nat", "POSTROUTING"): ("postrouting", "type nat hook postrouting priority srcnat; policy accept;"),
    ("filter", "FORWARD"): ("forward", "type filter hook forward priority filter; policy accept;"),
    ("filter", "INPUT"): ("input", "type filter hook input priority filter; policy accept;"),
}
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


class NftError(Exception):
    pass


class Nft:
    """libnftables through ctypes: one context, used by one thread at a time."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        except OSError as e:
            raise NftError(f"libnftables is not installed ({e}): apt-get install nftables") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for f in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, f).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for f in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, f).argtypes = [ctypes.c_void_p]
            getattr(lib, f).restype = ctypes.c_char_p
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("libnftables could not make a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lock = threading.Lock()

    def close(self) -> None:
        """Free the context (and its cache of the ruleset)."""
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._lib.nft_ctx_free(ctx)

    def __del__(self) -> None:
        self.close()

    def run(self, script: str, as_json: bool = False) -> str:
        """Run an nft script as one transaction; its output. NftError with nft's
        own message when the kernel (or the parser) refuses it: then nothing of
        it was applied."""
        with self._lock:
            lib, ctx = self._lib, self._ctx
            if not ctx:
                raise NftError("libnftables context closed")
            flags = lib.nft_ctx_output_get_flags(ctx)
            lib.nft_ctx_output_set_flags(ctx, (flags | _OUTPUT_JSON) if as_json else (flags & ~_OUTPUT_JSON))
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        if rc != 0:
            raise NftError(" ".join(err.split()) or f"nft failed ({rc})")
        return out


NETLINK_NETFILTER = 12
_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN
_NLMSG_ERROR = 2


class _Generation:
    """The nf_tables ruleset generation: every committed transaction, by
    anyone, raises it. One netlink round trip (NFT_MSG_GETGEN), about 20 µs:
    an apply or a check that sees the generation of our own last write knows
    that nobody changed anything since, without listing the table. One socket
    for the daemon's life: closing a netfilter netlink socket after a commit
    waits for an RCU grace period (7-14 ms measured here, more than the
    commit itself)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            try:
                return self._ask()
            except OSError:
                self._close()  # a socket in a bad state: one more try on a new one
                return self._ask()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _ask(self) -> int:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            self._sock.settimeout(2)  # an answer never lost so far; a lost one must not hang the worker
            self._sock.bind((0, 0))
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.sendto(struct.pack("=IHHII", 20, _GETGEN, 1, self._seq, 0) + struct.pack("=BBH", 0, 0, 0), (0, 0))
        while True:
            data = self._sock.recv(65536)
            length, kind, _, seq = struct.unpack_from("=IHHI", data)
            if seq == self._seq:
                break  # an answer to an earlier, abandoned question is skipped
        if kind == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, 16)
            raise OSError(-err, os.strerror(-err))
        off = 16 + 4  # nlmsghdr, nfgenmsg
        while off + 4 <= length:
            alen, atype = struct.unpack_from("=HH", data, off)
            if atype & 0x7FFF == 1:  # NFTA_GEN_ID, big-endian u32
                return struct.unpack_from(">I", data, off + 4)[0]
            off += (alen + 3) & ~3
        raise OSError("no generation in the nf_tables answer")


generation = _Generation()


def available() -> str | None:
    """None when nftables works here, else why not (one line)."""
    try:
        nft = Nft()
    except NftError as e:
        return str(e)
    try:
        nft.run("list tables")
    except NftError as e:
        return str(e)
    finally:
        nft.close()
    return None


def _quote(iface: str) -> str:
    return '"' + iface.replace('"', "") + '"'


def rule_text(rule: Rule) -> str:
    """A generic Rule as an nft rule (inet family: IPv4 matches say `ip`)."""
    parts = []
    if rule.in_iface:
        parts.append(f"iifname {_quote(rule.in_iface)}")
    if rule.out_iface:
        parts.append(f"oifname {_quote(rule.out_iface)}")
    elif rule.not_out_iface:
        parts.append(f"oifname != {_quote(rule.not_out_iface)}")
    if rule.src:
        parts.append(f"ip saddr {rule.src}")
    elif rule.not_src:
        parts.append(f"ip saddr != {rule.not_src}")
    if rule.dst:
        parts.append(f"ip daddr {rule.dst}")
    elif rule.not_dst:
        parts.append(f"ip daddr != {rule.not_dst}")
    if rule.proto:
        parts.append(f"{rule.proto} dport {rule.dport}" if rule.dport is not None else f"meta l4proto {rule.proto}")
    if rule.dst_local:
        parts.append("fib daddr type local")
    if rule.ctstate:
        parts.append(f"ct status {rule.ctstate.lower()}" if rule.ctstate == "DNAT" else f"ct state {rule.ctstate.lower()}")
    if rule.not_orig_dst:
        parts.append(f"ct original ip daddr != {rule.not_orig_dst}")
    if rule.limit:
        # the element of the source's address holds its bucket; "over":
        # matches the packets past the rate, counted
        parts.append(f"update @{meter_set(rule.meter)} {{ ip saddr limit rate over {rule.limit}/second "
                     f"burst {rule.limit} packets }} counter")
    t = rule.target
    if t.startswith("@"):
        parts.append(f"goto {t[1:]}")
    elif t == "DNAT":
        parts.append(f"dnat ip to {rule.to}")
    else:
        parts.append({"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject", "MASQUERADE": "masquerade",
                      "RETURN": "return"}[t])
    if rule.comment:
        parts.append('comment "' + rule.comment.replace('"', "")[:120] + '"')
    return " ".join(parts)


def meter_set(meter: str | None) -> str:
    return f"meter_{meter or 'default'}"


# a meter's set: its elements come and go with the traffic (an address
# unheard of for 10 s goes), so the diff and the checks never compare them;
# bounded, so spoofed sources cannot grow it without end
_METER_TYPE = "type ipv4_addr ; flags dynamic,timeout ; timeout 10s ; size 65536 ;"

_BASE_NAMES = frozenset(name for name, _ in _BASE.values())
_PORTS_LOOKUP = "fib daddr type local dnat ip to meta l4proto . th dport map @ports"
_ISOLATE_LOOKUPS = ("ip saddr . ip daddr . meta l4proto . th dport @allowed accept",
                    "meta l4proto icmp ip saddr . ip daddr @pairs accept")
# the table's maps and sets: name -> (kind, type)
_COLLECTIONS = {
    "links": ("map", "ipv4_addr : verdict"),
    "ports": ("map", "inet_proto . inet_service : ipv4_addr . inet_service"),
    "allowed": ("set", "ipv4_addr . ipv4_addr . inet_proto . inet_service"),
    "pairs": ("set", "ipv4_addr . ipv4_addr"),
}


# the last jump list (RuleSet.jumps) and the @links elements made of it: a
# move keeps the list, and its thousand elements are not made again
_last_links: tuple[list[Rule], dict[str, str]] | None = None


class Desired:
    """What the table should hold: chains (name -> rules, base chains by
    their hook name), and the elements of its maps and sets (key -> value as
    nft text; "" in a set). rules.build's link jumps, port DNATs and
    isolation tuples become elements; every other rule is written as it is."""

    def __init__(self, rules: RuleSet) -> None:
        global _last_links
        # the bridge: its forwarding is accepted (and let through other
        # tables' drop policies), its facades are looked up in @links
        self.bridge = next((r.in_iface for r in rules.chains.get(("filter", "FORWARD"), [])
                            if r.target == "ACCEPT" and r.in_iface), None)
        self.links: dict[str, str] = {}
        self.ports: dict[str, str] = {}
        self.allowed: dict[str, str] = {}
        self.pairs: dict[str, str] = {}
        lookups = {
            "prerouting": ([f"iifname {_quote(self.bridge)} ip daddr vmap @links"] if self.bridge else []) + [_PORTS_LOOKUP],
            "output": [_PORTS_LOOKUP],
        }
        self.chains: dict[str, tuple[str, ...]] = {}
        self.meters = tuple(sorted({meter_set(r.meter) for rs in rules.chains.values() for r in rs if r.limit}))
        for key, rs in rules.chains.items():
            if key == ("filter", "ISOLATE"):
                self.chains["ISOLATE"] = self._isolate(rs)
            elif key not in _BASE:  # a link group's chain
                self.chains[key[1]] = tuple(rule_text(r) for r in rs)
        jumps = rules.jumps
        cached = jumps is not None and _last_links is not None and _last_links[0] is jumps
        if cached:
            self.links = _last_links[1]  # the same object: the diff skips it
        for key, (name, _) in _BASE.items():
            plain = list(lookups.get(name, []))
            rs = rules.chains.get(key, [])
            if key == ("nat", "PREROUTING") and cached:
                rs = rs[len(jumps):]
            for r in rs:
                if r.target.startswith("@") and r.dst and key == ("nat", "PREROUTING"):
                    self.links[r.dst.removesuffix("/32")] = f"goto {r.target[1:]}"
                elif r.target == "DNAT" and r.dst_local and r.proto and r.dport is not None:
                    ip, _, port = r.to.rpartition(":")
                    self.ports[f"{r.proto} . {r.dport}"] = f"{ip} . {port}"
                else:
                    plain.append(rule_text(r))
            self.chains[name] = tuple(plain)
        if jumps is not None and not cached:
            _last_links = (jumps, self.links)

    def _isolate(self, rs: list[Rule]) -> tuple[str, ...]:
        """The isolation chain: its consumer -> target accepts become
        elements of @allowed (ICMP: @pairs), looked up before the final reject."""
        out: list[str] = []
        for r in rs:
            if r.target == "ACCEPT" and r.src and r.dst and r.proto and r.comment is None:
                if r.dport is not None:
                    self.allowed[f"{r.src} . {r.dst} . {r.proto} . {r.dport}"] = ""
                else:
                    self.pairs[f"{r.src} . {r.dst}"] = ""
                continue
            if r.target == "REJECT":
                out += _ISOLATE_LOOKUPS
            out.append(rule_text(r))
        return tuple(out)


def _iptables_nft(chain: dict) -> bool:
    """A chain iptables-nft made (Docker's FORWARD): a native nft rule in it
    would make `iptables -S` refuse the table; doctor says what to add instead."""
    return chain["family"] == "ip" and chain["table"] in ("filter", "nat", "mangle", "raw") and chain["name"].isupper()


def _text(v) -> str:
    """A map key or value of `nft -j` as this driver writes it."""
    if isinstance(v, dict):
        if "concat" in v:
            return " . ".join(_text(x) for x in v["concat"])
        for verdict in ("goto", "jump"):
            if verdict in v:
                return f"{verdict} {v[verdict]['target']}"
        if "elem" in v:
            return _text(v["elem"]["val"])
    return str(v)


def _element(e) -> tuple[str, str]:
    key, value = e
    return _text(key), _text(value)


def _elements(d: dict[str, str]) -> str:
    return ", ".join(f"{k} : {v}" if v else k for k, v in d.items())


class NftablesFirewall:
    def __init__(self, prefix: str, admit: list[Rule] = ()) -> None:
        self.prefix = prefix
        self.table = f"inet {prefix}"
        self.nft = Nft()
        self._applied: Desired | None = None
        self._gen: int | None = None  # the generation our last write left
        self.full_writes = 0  # how often the whole table was written (tests, doctor)
        # our accepts in iptables chains that would drop the bridge's traffic
        # (Docker's): `admit` until the first apply brings rules.build's
        self.admission = Admission(prefix, list(admit))

    # --- the driver protocol ---------------------------------------------
    def setup(self) -> None:
        """Nothing until the first apply writes the whole table; a table left
        by an earlier run is replaced then, whole and atomically."""
        self._applied = None

    def apply(self, rules: RuleSet) -> int:
        want = Desired(rules)
        have = self._applied
        if rules.admit:
            self.admission.rules = list(rules.admit)
        before = generation()
        if have is not None and self._gen != before and self._table_missing(have):
            have = None  # someone changed the table: the difference would be against nothing real
        if have is not None:
            script = self._diff(have, want)
            if not script:
                return 0
            try:
                self.nft.run(script)
                self._wrote(want, before)
                return 1
            except NftError:
                pass  # the kernel no longer holds what we wrote: write it whole
        self.nft.run(self._full(want))
        self._exempt(want.bridge)
        self._wrote(want, None)
        self.admission.ensure(force=True)
        self.full_writes += 1
        return 1

    # --- other tables' forward chains with a drop policy ---------------------
    # (firewalld's): a packet our forward chain accepts is still dropped
    # there, so tether puts two accepts for its bridge at the top of each
    # such chain, marked with a comment naming its prefix; doctor lists them,
    # teardown takes them out again. iptables' own chains (Docker's FORWARD
    # and DOCKER-USER) are the Admission's: through their own command.
    def _mark(self) -> str:
        return f"tether {self.prefix}: forwarding of its bridge"

    def exemptions(self) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str, int]]]:
        """(drop-policy forward chains of other tables, our accept rules in
        them by handle)."""
        data = json.loads(self.nft.run("list ruleset", as_json=True))
        chains, ours = [], []
        mark = self._mark()
        for item in data.get("nftables", []):
            c = item.get("chain")
            if c and c.get("hook") == "forward" and c.get("policy") == "drop" and c["family"] in ("ip", "inet") \
                    and not (c["family"] == "inet" and c["table"] == self.prefix) and not _iptables_nft(c):
                chains.append((c["family"], c["table"], c["name"]))
            r = item.get("rule")
            if r and r.get("comment") == mark and not _iptables_nft({"family": r["family"], "table": r["table"],
                                                                      "name": r["chain"]}):
                ours.append((r["family"], r["table"], r["chain"], r["handle"]))
        return chains, ours

    def _exempt(self, bridge: str | None) -> list[str]:
        """Make every drop-policy forward chain of another table accept our
        bridge; returns the chains it added the accepts to."""
        if not bridge:
            return []
        chains, ours = self.exemptions()
        have: dict[tuple[str, str, str], int] = {}
        for fam, table, chain, _ in ours:
            have[(fam, table, chain)] = have.get((fam, table, chain), 0) + 1
        script, added = [], []
        for key in chains:
            if have.get(key, 0) >= 2:
                continue
            fam, table, chain = key
            for fam_, table_, chain_, handle in ours:  # a half-removed pair: start again
                if (fam_, table_, chain_) == key:
                    script.append(f"delete rule {fam} {table} {chain} handle {handle}")
            for where in ("oifname", "iifname"):
                script.append(f'insert rule {fam} {table} {chain} {where} {_quote(bridge)} accept comment "{self._mark()}"')
            added.append(f"{fam} {table} {chain}")
        if script:
            self.nft.run("\n".join(script) + "\n")
        return added

    def _unexempt(self) -> None:
        _, ours = self.exemptions()
        if ours:
            self.nft.run("".join(f"delete rule {f} {t} {c} handle {h}\n" for f, t, c, h in ours))

    def _wrote(self, want: Desired, before: int | None) -> None:
        self._applied = want
        self._gen = generation()
        self.admission.advance(before, self._gen)

    def _listing(self) -> tuple[dict[str, list[str]], dict[str, dict[str, str]], set[str]] | None:
        """Our table as the kernel holds it: ({chain: its rules' expressions
        as JSON}, {map: {key: value} as this driver writes them}, the meter
        sets); None when there is no table."""
        try:
            data = json.loads(self.nft.run(f"list table {self.table}", as_json=True))
        except NftError:
            return None
        rules: dict[str, list[str]] = {}
        maps: dict[str, dict[str, str]] = {}
        meters: set[str] = set()
        for item in data.get("nftables", []):
            if "chain" in item:
                rules.setdefault(item["chain"]["name"], [])
            elif "rule" in item:
                rules.setdefault(item["rule"]["chain"], []).append(json.dumps(item["rule"]["expr"]))
            elif "map" in item:
                maps[item["map"]["name"]] = dict(_element(e) for e in item["map"].get("elem", []))
            elif "set" in item and item["set"]["name"].startswith("meter_"):
                meters.add(item["set"]["name"])
            elif "set" in item:
                maps[item["set"]["name"]] = {_text(e): "" for e in item["set"].get("elem", [])}
        return rules, maps, meters

    def missing(self) -> list[str]:
        """What of our last write the kernel does not hold (our table: its
        chains, rules counted per chain, map elements; our accepts in other
        tools' chains that would drop the bridge's traffic), one line each;
        [] when it holds all of it."""
        if self._applied is None:
            return []
        return self._table_missing(self._applied) + self.admission.missing()

    def _table_missing(self, want: Desired) -> list[str]:
        """What of `want` the kernel's table lacks: chains, rules (counted per
        chain) and map elements, one line each; [] when it holds all of it,
        and nothing else in our table."""
        listing = self._listing()
        if listing is None:
            return [f"table {self.table}"]
        rules, maps, meters = listing
        out = []
        for name, rs in want.chains.items():
            if name not in rules:
                out.append(f"chain {name}")
            elif len(rules[name]) != len(rs):
                out.append(f"chain {name}: {len(rules[name])} of its {len(rs)} rules")
        out += [f"chain {name} (not ours)" for name in rules if name not in want.chains]
        out += [f"set {m}" for m in want.meters if m not in meters]
        for m, (kind, _) in _COLLECTIONS.items():
            if m not in maps:
                out.append(f"{kind} {m}")
                continue
            w, h = getattr(want, m), maps[m]
            lost = [k for k, v in w.items() if h.get(k) != v]
            if lost:
                out.append(f"map {m}: {len(lost)} of its {len(w)} elements ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})")
            if len(h) > len(w) - len(lost):
                out.append(f"map {m}: {len(h) - (len(w) - len(lost))} elements that are not ours")
        return out

    def heal(self) -> list[str]:
        """Restore what someone changed since our last write (a flush, a
        deleted table, chain, rule or element; our accepts in another tool's
        chain): what was missing, [] when nothing was. Cheap when nobody
        wrote: one generation query (and a listing of the legacy filter
        table, when one is loaded)."""
        if self._applied is None:
            return []
        lost = self.admission.ensure()  # first: its own commits then leave our generation check alone
        if self._gen == generation():
            return lost
        table = self._table_missing(self._applied)
        if table:
            self.nft.run(self._full(self._applied))
            self.full_writes += 1
        lost = table + lost
        lost += [f"the accepts for {self._applied.bridge} in {c} (a drop-policy forward chain)"
                 for c in self._exempt(self._applied.bridge)]
        self._gen = generation()
        return lost

    def check(self) -> tuple[bool, str, str]:
        """(ok, what the kernel holds of us, the fix) for `tether doctor`."""
        see = f"`nft list table {self.table}`"
        listing = self._listing()
        if listing is None:
            return (False, f"no table {self.table}: tether-fused is not running, or someone deleted it",
                    f"start (or restart) tether-fused: it writes its table at start and within 2 s of a removal; then {see}")
        chains, maps, _ = listing
        elements = {m: len(e) for m, e in maps.items()}
        base = [n for n in _BASE_NAMES if n in chains]
        if len(base) < len(_BASE) or set(elements) != set(_COLLECTIONS):
            return (False, f"table {self.table} lacks {sorted(_BASE_NAMES - set(base))} "
                    f"or its maps ({sorted(elements)})", "restart tether-fused: it writes the whole table at start")
        drop, ours = self.exemptions()
        exempt = sorted({f"{f} {t} {c}" for f, t, c, _ in ours})
        unexempt = [f"{f} {t} {c}" for f, t, c in drop if f"{f} {t} {c}" not in exempt]
        if unexempt:
            return (False, f"forward chains with a drop policy drop tether's traffic: {', '.join(unexempt)}",
                    "restart tether-fused: it adds accepts for its bridge at the top of such chains")
        ok, admitted, fix = self.admission.check()
        if not ok:
            return (False, admitted, fix)
        told = (f"; it added accepts for its bridge to the drop-policy forward chain(s) {', '.join(exempt)}"
                if exempt else "")
        if admitted:
            told += f"; it {admitted}"
        isolated = "ISOLATE" in chains
        if isolated:
            told = f"; isolation: {elements['allowed']} consumer . target . port tuples allowed" + told
        return (True, f"table {self.table}: {len(base)} base chains, {len(chains) - len(base) - isolated} link group chains, "
                f"{elements['links']} links and {elements['ports']} published ports as map elements; {see} shows them"
                + told, "")

    def exists(self) -> bool:
        try:
            self.nft.run(f"list table {self.table}")
        except NftError:
            return False
        return True

    def teardown(self) -> None:
        self._unexempt()
        self.admission.remove()
        self.nft.run(f"add table {self.table}\ndelete table {self.table}\n")
        self._applied = None

    def dump(self) -> dict[tuple[str, str], list[str]]:
        """{(table, chain or "map NAME"): its rules (JSON expressions) or its
        elements ("key : value")}; {} when there is no table."""
        listing = self._listing()
        if listing is None:
            return {}
        rules, maps, _ = listing
        out = {(self.table, chain): rs for chain, rs in rules.items()}
        out |= {(self.table, "map " + m): [f"{k} : {v}" for k, v in e.items()] for m, e in maps.items()}
        return out

    # --- scripts ------------------------------------------------------------
    def _full(self, want: Desired) -> str:
        t = self.table
        lines = [f"add table {t}", f"delete table {t}", f"add table {t}"]
        lines += [f"add {kind} {t} {m} {{ type {type_} ; }}" for m, (kind, type_) in _COLLECTIONS.items()]
        lines += [f"add set {t} {m} {{ {_METER_TYPE} }}" for m in want.meters]
        for name in want.chains:
            if name not in _BASE_NAMES:
                lines.append(f"add chain {t} {name}")
        for key, (name, spec) in _BASE.items():
            lines.append(f"add chain {t} {name} {{ {spec} }}")
        for name, rs in want.chains.items():
            lines += [f"add rule {t} {name} {r}" for r in rs]
        for m in _COLLECTIONS:
            if elements := getattr(want, m):
                lines.append(f"add element {t} {m} {{ {_elements(elements)} }}")
        return "\n".join(lines) + "\n"

    def _diff(self, have: Desired, want: Desired) -> str:
        t = self.table
        lines = [f"add set {t} {m} {{ {_METER_TYPE} }}" for m in want.meters if m not in have.meters]
        for name, rs in want.chains.items():
            if name not in have.chains:
                lines.append(f"add chain {t} {name}")
                lines += [f"add rule {t} {name} {r}" for r in rs]
            elif have.chains[name] != rs:
                lines.append(f"flush chain {t} {name}")
                lines += [f"add rule {t} {name} {r}" for r in rs]
        for m in _COLLECTIONS:
            a, b = getattr(have, m), getattr(want, m)
            if a is b:
                continue
            gone = [k for k, v in a.items() if b.get(k) != v]
            new = {k: v for k, v in b.items() if a.get(k) != v}
            if gone:
                lines.append(f"delete element {t} {m} {{ {', '.join(gone)} }}")
            if new:
                lines.append(f"add element {t} {m} {{ {_elements(new)} }}")
        for name in have.chains:
            if name not in want.chains:  # after the elements that jump to it
                lines += [f"flush chain {t} {name}", f"delete chain {t} {name}"]
        return "\n".join(lines) + "\n" if lines else ""
