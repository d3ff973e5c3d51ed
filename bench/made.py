"""What a benchmark run made, and which of it is still there: pure, no I/O.

`make bench` runs on machines where other people work: another shell's
`sleep`, another tether-fused's bridge, a podman's chains. The benchmark is
judged only on what it made itself, so every part records, as it goes, the
names it generated (bridges, chain prefixes, network names, subnets, temp
dirs, cgroup prefixes) and the processes it started, and every process it
starts carries a marker in its environment (inherited by their children,
also once they are orphaned). `left_behind` then picks, from one observation
of the machine (`Seen`, made by bench.track.observe), only what is ours.
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field

MARKER = "TETHER_BENCH_RUN"  # environment variable: this run's marker, inherited by every child


@dataclass
class Made:
    """Everything one benchmark run made, by name."""

    pid: int  # the benchmark's own process: its descendants are ours
    marker: str  # the value of MARKER in the environment of what it starts
    procs: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time) of processes it started
    dirs: set[str] = field(default_factory=set)  # temp dirs (everything under them, mounts included)
    bridges: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)  # veths seen on its bridges
    subnets: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # chain prefixes, network names: found in rules
    cgroup_prefixes: set[str] = field(default_factory=set)  # "tether-test-<tag>-"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22): a reused pid has another
    state: str  # "Z": a zombie, reaped when its parent exits; not a process left behind
    cmdline: str
    marker: str | None  # its MARKER environment variable, if any
    cgroup: str  # /proc/PID/cgroup


@dataclass(frozen=True)
class Link:
    name: str
    master: str | None = None


@dataclass
class Seen:
    """One observation of the machine: everything there, ours or not."""

    procs: list[Proc] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # "TOOL -t TABLE " + a line of `TOOL -t TABLE -S`
    mounts: list[str] = field(default_factory=list)  # mount points
    dirs: list[str] = field(default_factory=list)  # paths that exist (candidates: the temp dirs)
    cgroups: list[str] = field(default_factory=list)


def _under(path: str, dirs: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _processes(made: Made, seen: Seen) -> list[str]:
    """Processes it started, or that carry its marker, run in its cgroups or
    name its dirs, and every descendant of those and of the benchmark itself."""
    by_pid = {p.pid: p for p in seen.procs}

    def itself_ours(p: Proc) -> bool:
        return (
            p.pid == made.pid
            or (p.pid, p.start) in made.procs
            or (p.marker is not None and p.marker == made.marker)
            or any(f"/{c}" in p.cgroup for c in made.cgroup_prefixes)
            or any(d in p.cmdline for d in made.dirs)
        )

    def ours(p: Proc) -> bool:
        for _ in range(4096):  # up the tree, to pid 1 (or a parent that is gone)
            if itself_ours(p):
                return True
            if p.ppid not in by_pid or p.ppid == p.pid:
                return False
            p = by_pid[p.ppid]
        return False

    return [f"{p.pid} {p.cmdline}" for p in seen.procs if p.pid != made.pid and p.state != "Z" and ours(p)]


_ADDR = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?\b")


def _rules(made: Made, seen: Seen) -> list[str]:
    """Rules that name something of ours (a bridge, a chain prefix, a network
    name, an address in one of our subnets), the chains they alone jump to
    (a peer's per-network chains), and the rules in those chains."""
    subnets = [ipaddress.ip_network(s, strict=False) for s in made.subnets]
    tokens = made.bridges | made.names

    def names_ours(line: str) -> bool:
        if any(t in line for t in tokens):
            return True
        for a in _ADDR.findall(line):
            try:
                net = ipaddress.ip_network(a, strict=False)
            except ValueError:
                continue
            if any(net.version == s.version and net.subnet_of(s) for s in subnets):
                return True
        return False

    parsed = []  # (line, table key, words)
    for line in seen.rules:
        tool, _, table, rest = (line.split(" ", 3) + ["", "", "", ""])[:4]
        try:
            words = shlex.split(rest)
        except ValueError:
            words = rest.split()
        parsed.append((line, (tool, table), words))

    def target(words: list[str]) -> str | None:
        for flag in ("-j", "-g"):
            if flag in words[:-1]:
                return words[words.index(flag) + 1]
        return None

    ours_line = {line: names_ours(line) for line, _, _ in parsed}
    jumped_by_ours: set[tuple] = set()
    jumped_by_others: set[tuple] = set()
    for line, key, words in parsed:
        if words[:1] == ["-A"] and (t := target(words)):
            (jumped_by_ours if ours_line[line] else jumped_by_others).add((key, t))
    ours_chains = {c for c in jumped_by_ours if c not in jumped_by_others}
    ours_chains |= {(key, words[1]) for line, key, words in parsed if words[:1] == ["-N"] and ours_line[line]}
    out = []
    for line, key, words in parsed:
        if words[:1] == ["-P"]:
            continue
        in_ours = len(words) > 1 and (key, words[1]) in ours_chains
        if ours_line[line] or in_ours:
            out.append(line)
    return out


_SOMEBODYS = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}|--[ds]port|(?:^| )-[io] |--comment \"?[^\"]*\b(?:name|id):")


def removable_chains(made: Made, rules: list[str], new: dict[tuple[str, str], set[str]]) -> dict[tuple[str, str], set[str]]:
    """Of the peers' chains that appeared during the run (`new`: {(tool,
    table): names}), those that may go: every rule in them and every rule
    that jumps to them is ours, or names nobody (no address, port, interface
    or network name: netavark's and CNI's fixed rules). A podman that started
    at the same time shares netavark's top-level chains: its rules keep them."""
    ours = set(_rules(made, Seen(rules=rules)))
    out: dict[tuple[str, str], set[str]] = {}
    for (tool, table), names in new.items():
        prefix = f"{tool} -t {table} "
        lines = [(l, l[len(prefix):].split()) for l in rules if l.startswith(prefix)]
        for name in names:
            touching = [l for l, w in lines if w[:1] == ["-A"] and len(w) > 1
                        and (w[1] == name or any(w[i] in ("-j", "-g") and w[i + 1] == name for i in range(len(w) - 1)))]
            if all(l in ours or not _SOMEBODYS.search(l[len(prefix):]) for l in touching):
                out.setdefault((tool, table), set()).add(name)
    return out


def left_behind(made: Made, seen: Seen) -> dict[str, list[str]]:
    """{kind: sorted descriptions} of what `made` made that `seen` still shows;
    kinds with nothing are left out, so {} means nothing is left behind."""
    tokens = made.bridges | made.names
    found = {
        "processes": _processes(made, seen),
        "links": [
            l.name for l in seen.links
            if l.name in made.bridges or l.name in made.links or (l.master is not None and l.master in made.bridges)
        ],
        "netns": [n for n in seen.netns if any(t in n for t in tokens) or _under(n, made.dirs)],
        "chains/rules": _rules(made, seen),
        "mounts": [m for m in seen.mounts if _under(m, made.dirs)],
        "dirs": [d for d in seen.dirs if _under(d, made.dirs)],
        "cgroups": [c for c in seen.cgroups if any(c.rsplit("/", 1)[-1].startswith(p) for p in made.cgroup_prefixes)],
    }
    return {k: sorted(v) for k, v in found.items() if v}
