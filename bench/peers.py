"""The peers tether is measured against, invoked the way their runtimes do.

- netavark (podman's network backend): `netavark --config DIR setup|teardown
  NETNS` with podman's network options JSON on stdin. podman does the IPAM
  itself and passes `static_ips`; so do we.
- CNI (containernetworking-plugins): the plugin binaries with the CNI_*
  environment and the network configuration on stdin; `bridge` (which runs
  `host-local` for IPAM), and for a published port `portmap` chained after it
  the way libcni runs a conflist: ADD bridge, then ADD portmap with the
  bridge's result as `prevResult`; DEL in reverse order, each with the cached
  result.
- LXCFS: `lxcfs -f MOUNTDIR`, a FUSE filesystem of /proc files.

Every network a peer gets lives in a network namespace this module made
(`unshare -n sleep`), on a bridge and subnet of its own; `close()` removes
the bridges, the IPAM state, and every firewall chain the peers created
(netavark and the CNI plugins leave their top-level chains behind: only
those that were not there before the benchmark and that hold no rule of
anybody else's are removed, bench.made.removable_chains).
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench import made, track
from bench.made import MARKER

NETAVARK = shutil.which("netavark") or "/usr/lib/podman/netavark"
CNI_PATH = "/usr/lib/cni"
LXCFS = shutil.which("lxcfs") or "/usr/bin/lxcfs"
# chains the peers create (nft or legacy, whichever `iptables` is here)
PEER_CHAIN_PREFIXES = ("NETAVARK", "CNI-")
IPTABLES = track.IPTABLES


def available() -> dict[str, bool]:
    return {
        "netavark": os.access(NETAVARK, os.X_OK),
        "cni": all(os.access(f"{CNI_PATH}/{p}", os.X_OK) for p in ("bridge", "host-local", "portmap")),
        "lxcfs": os.access(LXCFS, os.X_OK),
    }


def _run(cmd: list[str], data: bytes | None = None, env: dict | None = None) -> bytes:
    p = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}{p.stdout.decode(errors='replace')[-2000:]}")
    return p.stdout


# --- network namespaces ------------------------------------------------------
class Netns:
    """A process alone in a new network namespace (only `lo`), killed on close."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "-n", "sleep", "600"], stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        track.started(self.pid)
        self.path = f"/proc/{self.pid}/ns/net"
        host = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while os.stat(self.path).st_ino == host:  # unshare has not run yet
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("unshare -n did not create a network namespace")
            time.sleep(0.001)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- firewall leftovers ----------------------------------------------------------
def peer_chains() -> dict[tuple[str, str], set[str]]:
    """{(tool, table): chains} of the peers' chains that exist now."""
    out: dict[tuple[str, str], set[str]] = {}
    for tool in IPTABLES:
        if not shutil.which(tool):
            continue
        for table in ("nat", "filter", "mangle"):
            p = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True)
            chains = {
                line.split()[1]
                for line in p.stdout.splitlines()
                if line.startswith("-N ") and line.split()[1].startswith(PEER_CHAIN_PREFIXES)
            }
            if chains:
                out[(tool, table)] = chains
    return out


def remove_chains(chains: dict[tuple[str, str], set[str]]) -> None:
    """Delete the given chains and every rule that jumps to them."""
    for (tool, table), names in chains.items():
        rules = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True).stdout.splitlines()
        for line in rules:
            parts = shlex.split(line)
            if parts[:1] != ["-A"] or parts[1] in names:
                continue
            if "-j" in parts and parts[parts.index("-j") + 1] in names:
                subprocess.run([tool, "-t", table, "-D", *parts[1:]], capture_output=True)
        for name in names:
            subprocess.run([tool, "-t", table, "-F", name], capture_output=True)
        for name in names:
            subprocess.run([tool, "-t", table, "-X", name], capture_output=True)


def new_chains(before: dict, after: dict) -> dict:
    """The chains in `after` that were not in `before`, and that only we use
    (a podman started meanwhile may have made and use the same ones)."""
    new = {k: v - before.get(k, set()) for k, v in after.items() if v - before.get(k, set())}
    return made.removable_chains(track.MADE, track.rules(), new)


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def _hosts(subnet: str) -> list[str]:
    return [str(h) for h in ipaddress.IPv4Network(subnet).hosts()]


# --- netavark ------------------------------------------------------------------
class Netavark:
    """One podman-style bridge network, kept alive by a long-lived container."""

    def __init__(self, tmp: Path, subnet: str, host_port: int) -> None:
        tag = secrets.token_hex(3)
        self.dir = tmp / f"netavark-{tag}"
        (self.dir / "config").mkdir(parents=True)
        self.name = f"tbench{tag}"
        self.bridge = f"nvb{tag}"
        self.subnet = subnet
        self.host_port = host_port
        self.net_id = secrets.token_hex(32)
        hosts = _hosts(subnet)
        self.gateway, self.keep_ip, self.pool = hosts[0], hosts[1], hosts[2:]
        self.n = 0
        self.keep: Netns | None = None
        self.keep_opts: bytes | None = None
        track.MADE.dirs.add(str(self.dir))
        track.MADE.bridges.add(self.bridge)
        track.MADE.names.add(self.name)
        track.MADE.subnets.add(subnet)

    def options(self, cid: str, name: str, ip: str, port: bool) -> bytes:
        opts = {
            "container_id": cid,
            "container_name": name,
            "networks": {self.name: {"interface_name": "eth0", "static_ips": [ip], "aliases": [name]}},
            "network_info": {
                self.name: {
                    "name": self.name,
                    "id": self.net_id,
                    "driver": "bridge",
                    "network_interface": self.bridge,
                    "subnets": [{"subnet": self.subnet, "gateway": self.gateway}],
                    "ipv6_enabled": False,
                    "internal": False,
                    "dns_enabled": False,
                    "ipam_options": {"driver": "host-local"},
                }
            },
        }
        if port:
            opts["port_mappings"] = [
                {"host_ip": "", "container_port": 5432, "host_port": self.host_port, "range": 1, "protocol": "tcp"}
            ]
        return json.dumps(opts).encode()

    def _cmd(self, op: str, ns: Netns) -> list[str]:
        return [NETAVARK, "--config", str(self.dir / "config"), op, ns.path]

    def start(self) -> None:
        self.keep = Netns()
        self.keep_opts = self.options(secrets.token_hex(32), "keepalive", self.keep_ip, False)
        _run(self._cmd("setup", self.keep), self.keep_opts)

    def once(self, port: bool) -> float:
        """setup + teardown of a new container in a fresh netns: ms."""
        ip = self.pool[self.n % len(self.pool)]
        self.n += 1
        opts = self.options(secrets.token_hex(32), f"bench{self.n}", ip, port)
        with Netns() as ns:
            t0 = time.perf_counter()
            _run(self._cmd("setup", ns), opts)
            _run(self._cmd("teardown", ns), opts)
            return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        if self.keep is not None:
            try:
                _run(self._cmd("teardown", self.keep), self.keep_opts)
            except RuntimeError:
                pass
            self.keep.close()
            self.keep = None
        track.bridge_ports(self.bridge)
        delete_link(self.bridge)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- CNI ----------------------------------------------------------------------------
class Cni:
    """CNI bridge + host-local, optionally with portmap chained after it."""

    def __init__(self, tmp: Path, subnet: str, host_port: int) -> None:
        tag = secrets.token_hex(3)
        self.dir = tmp / f"cni-{tag}"
        self.dir.mkdir(parents=True)
        self.name = f"tbench-cni{tag}"
        self.bridge = f"cnb{tag}"
        self.subnet = subnet
        self.host_port = host_port
        self.gateway = _hosts(subnet)[0]
        self.n = 0
        track.MADE.dirs.add(str(self.dir))
        track.MADE.bridges.add(self.bridge)
        track.MADE.names.add(self.name)
        track.MADE.subnets.add(subnet)

    def bridge_conf(self) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.dir / "ipam"),
                "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }

    def portmap_conf(self, prev: dict) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": self.name,
            "type": "portmap",
            "capabilities": {"portMappings": True},
            "snat": True,
            "prevResult": prev,
            "runtimeConfig": {"portMappings": [{"hostPort": self.host_port, "containerPort": 5432, "protocol": "tcp"}]},
        }

    def _plugin(self, plugin: str, command: str, cid: str, ns: Netns, conf: dict) -> bytes:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": ns.path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": CNI_PATH,
            MARKER: track.MADE.marker,  # a fresh environment: ours all the same
        }
        return _run([f"{CNI_PATH}/{plugin}"], json.dumps(conf).encode(), env)

    def once(self, port: bool) -> float:
        """ADD + DEL of a new container in a fresh netns: ms."""
        self.n += 1
        cid = f"bench{self.n}-{secrets.token_hex(8)}"
        with Netns() as ns:
            t0 = time.perf_counter()
            result = json.loads(self._plugin("bridge", "ADD", cid, ns, self.bridge_conf()))
            if port:
                result = json.loads(self._plugin("portmap", "ADD", cid, ns, self.portmap_conf(result)))
                self._plugin("portmap", "DEL", cid, ns, self.portmap_conf(result))
            self._plugin("bridge", "DEL", cid, ns, dict(self.bridge_conf(), prevResult=result))
            return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        track.bridge_ports(self.bridge)
        delete_link(self.bridge)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- LXCFS --------------------------------------------------------------------------
class Lxcfs:
    """lxcfs in the foreground on a mount point of our own."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / f"lxcfs-{secrets.token_hex(3)}"
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None
        track.MADE.dirs.add(str(self.dir))

    @property
    def uptime(self) -> str:
        return str(self.mnt / "proc" / "uptime")

    def start(self, timeout: float = 10) -> None:
        self.log = open(self.dir / "lxcfs.log", "wb")
        self.proc = subprocess.Popen(
            [LXCFS, "-f", "-p", str(self.dir / "lxcfs.pid"), str(self.mnt)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        track.started(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lxcfs exited {self.proc.returncode}: {(self.dir / 'lxcfs.log').read_text()[-2000:]}")
            if os.path.ismount(self.mnt) and os.path.exists(self.uptime):
                with open(self.uptime) as f:
                    if f.read():
                        return
            time.sleep(0.02)
        raise RuntimeError("lxcfs did not mount in time")

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount", "-u", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.log.close()
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
