"""The record of what this benchmark run made (bench.made.Made), kept as it
goes, and the observation of the machine it is checked against at the end.

Importing this module puts this run's marker into the environment, so that
every process the benchmark starts from then on (and their children, also
once orphaned) can be told apart from anybody else's. Parts record what they
make: `Daemon` (the test harness's isolated tether-fused) records its dir,
bridge, chain prefix, subnets, cgroup prefix and processes; bench.peers
records its bridges, networks, dirs and processes.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
import harness  # noqa: E402
from bench.made import MARKER, Link, Made, Proc, Seen  # noqa: E402

MADE = Made(pid=os.getpid(), marker=secrets.token_hex(8))
os.environ[MARKER] = MADE.marker
IPTABLES = ("iptables-nft", "iptables-legacy")


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def started(pid: int) -> None:
    """Record a process this run started."""
    t = start_time(pid)
    if t is not None:
        MADE.procs.add((pid, t))


def mkdtemp(prefix: str = "tether-bench-") -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    MADE.dirs.add(str(d))
    return d


def bridge_ports(bridge: str) -> None:
    """Record the links on one of our bridges (before the bridge goes: a veth
    whose container is still alive would stay, with no master)."""
    MADE.links.update(harness.bridge_ports(bridge))


class Daemon(harness.Daemon):
    """The harness's isolated tether-fused, recorded in MADE."""

    def __init__(self, *args, **kw) -> None:
        kw.setdefault("driver", "auto")  # what a user gets
        super().__init__(*args, **kw)
        MADE.dirs.add(str(self.dir))
        MADE.bridges.add(self.bridge)
        MADE.names.add(self.chain_prefix)
        MADE.subnets.update((self.subnet, self.facade))
        MADE.cgroup_prefixes.add(f"tether-test-{self.tag}-")

    def start(self, timeout: float = 15) -> None:
        super().start(timeout)
        started(self.proc.pid)
        for which in ("fused", "fsd"):
            try:
                started(self.pid_of(which))
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        bridge_ports(self.bridge)
        super().close()


# --- the observation -------------------------------------------------------------
def _out(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    except OSError:
        return ""


def _proc(pid: int) -> Proc | None:
    base = Path("/proc", str(pid))
    try:
        stat = (base / "stat").read_text()
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        cgroup = (base / "cgroup").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    marker = None
    try:
        for var in (base / "environ").read_bytes().split(b"\0"):
            if var.startswith(MARKER.encode() + b"="):
                marker = var.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return Proc(pid=pid, ppid=int(fields[1]), start=int(fields[19]), state=fields[0], cmdline=cmdline,
                marker=marker, cgroup=cgroup)


def _links() -> list[Link]:
    out = []
    for line in _out("ip", "-o", "link").splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        words = parts[2].split()
        master = words[words.index("master") + 1] if "master" in words[:-1] else None
        out.append(Link(parts[1].strip().split("@")[0], master))
    return out


def rules() -> list[str]:
    """Every iptables rule and chain, nft and legacy: "TOOL -t TABLE " + a line of -S."""
    out = [f"{tool} -t {table} {line}" for tool in IPTABLES for table in ("nat", "filter", "mangle")
           for line in _out(tool, "-t", table, "-S").splitlines()]
    # and every nftables table by name (tether's nftables driver makes one per prefix)
    out += [f"nft -t {line.split()[1]} {line}" for line in _out("nft", "list", "tables").splitlines() if line.startswith("table ")]
    return out


def observe() -> Seen:
    procs = [p for p in (_proc(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()) if p]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    tmp = Path(tempfile.gettempdir())
    dirs = sorted({str(p) for p in tmp.glob("tether-*")} | {d for d in MADE.dirs if os.path.lexists(d)})
    return Seen(
        procs=procs,
        links=_links(),
        netns=[line.split()[0] for line in _out("ip", "netns", "list").splitlines() if line.strip()],
        rules=rules(),
        mounts=mounts,
        dirs=dirs,
        cgroups=[str(c) for c in Path("/sys/fs/cgroup").glob("**/tether-test-*")],
    )
