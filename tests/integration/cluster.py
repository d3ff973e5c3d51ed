"""Test harness for several hosts: a throwaway etcd, and "hosts" that are
network namespaces of the test's own, joined by an underlay bridge.

    net = Underlay()            # netns u<tag> with a bridge; etcd on it
    etcd = net.etcd()           # listens on an address of u<tag> only
    h1 = net.host("h1")         # netns h<tag>1, a veth on the underlay

All traffic stays among these namespaces. `close()` removes every process
(by PID), namespace (their veths go with them) and directory, even when a
test failed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import _TAKEN, free_subnet, sh, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class Etcd:
    """etcd in network namespace `ns`, listening on `ip` only."""

    def __init__(self, ns: str, ip: str, workdir: Path) -> None:
        self.ns, self.ip = ns, ip
        self.dir = workdir / f"etcd-{ip}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "etcd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:2379"

    def start(self, timeout: float = 20) -> None:
        assert self.proc is None or self.proc.poll() is not None
        peer = f"http://{self.ip}:2380"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, ETCD, "--name", "t", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--max-txn-ops", "4096", "--logger", "zap",
             "--log-outputs", "stderr"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        wait_for(self.healthy, timeout, interval=0.05, what=f"etcd at {self.endpoint} ({self.log})")

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"etcd exited:\n{self.log.read_text()[-3000:]}")
        p = sh("ip", "netns", "exec", self.ns, "etcdctl", "--endpoints", self.endpoint, "endpoint", "health",
               check=False, timeout=10) if shutil.which("etcdctl") else None
        if p is not None:
            return p.returncode == 0
        return _get(self.ns, f"{self.endpoint}/health")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


def _get(ns: str, url: str) -> bool:
    p = sh("ip", "netns", "exec", ns, "python3", "-c",
           f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1)", check=False)
    return p.returncode == 0


class Underlay:
    """A bridge in its own namespace joining the hosts' namespaces."""

    def __init__(self) -> None:
        self.tag = "%05x" % random.randrange(1 << 20)
        self.ns = f"tu{self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"tether-cluster-{self.tag}-"))
        net = free_subnet(24, range(200, 250), _TAKEN)
        self.prefix = net.rsplit(".", 1)[0]  # 10.a.b
        self.namespaces: list[str] = []
        self.etcds: list[Etcd] = []
        self.hosts: dict[str, str] = {}  # name -> netns
        self.addresses: dict[str, str] = {}  # name -> underlay address
        self._ns(self.ns)
        sh("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.ns, "link", "set", "br0", "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.prefix}.2/24", "dev", "br0")

    def _ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def etcd(self) -> Etcd:
        e = Etcd(self.ns, f"{self.prefix}.2", self.dir)
        self.etcds.append(e)
        e.start()
        return e

    def host(self, name: str) -> tuple[str, str]:
        """A host namespace on the underlay: (its netns, its underlay address)."""
        i = len(self.hosts) + 1
        ns = f"th{self.tag}{i}"
        self._ns(ns)
        sh("ip", "link", "add", f"tu{self.tag}{i}", "netns", self.ns, "type", "veth", "peer", "name", "u0", "netns", ns)
        sh("ip", "-n", self.ns, "link", "set", f"tu{self.tag}{i}", "master", "br0", "up")
        addr = f"{self.prefix}.{10 + i}"
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "u0")
        sh("ip", "-n", ns, "link", "set", "u0", "up")
        self.hosts[name] = ns
        self.addresses[name] = addr
        return ns, addr

    def address(self, name: str) -> str:
        return self.addresses[name]

    def close(self) -> None:
        for e in self.etcds:
            e.kill()
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def etcd_reachable_from_here() -> tuple[Underlay, Etcd, str]:
    """etcd in a namespace of its own, reached from this (the root) namespace
    through a veth: for tests of the store itself."""
    net = Underlay()
    e = net.etcd()
    veth = f"tv{net.tag}"
    sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"tw{net.tag}", "netns", net.ns)
    sh("ip", "-n", net.ns, "link", "set", f"tw{net.tag}", "master", "br0", "up")
    sh("ip", "addr", "add", f"{net.prefix}.3/24", "dev", veth)
    sh("ip", "link", "set", veth, "up")
    return net, e, e.endpoint


class Cluster:
    """`n` hosts, each a namespace with its own tether-fused (its own
    run_dir, state_dir, bridge and chain prefix), one address space in one
    etcd, joined by the underlay."""

    def __init__(self, rootfs: Path, n: int = 3, strategy: str = "facade", driver: str = "nftables",
                 lease_ttl: int = 3, ports: int = 100) -> None:
        from harness import Daemon

        self.net = Underlay()
        self.daemons: dict[str, Daemon] = {}
        try:
            self.etcd = self.net.etcd()
            subnet = free_subnet(24, range(100, 200), _TAKEN)
            facade = free_subnet(24, range(200, 250), _TAKEN)
            port_base = 41000 + random.randrange(200) * 100
            self.prefix = f"/tether-{self.net.tag}"
            for i in range(1, n + 1):
                name = f"h{i}"
                ns, addr = self.net.host(name)
                extra = (f'\n[store]\nbackend = "etcd"\nendpoints = ["{self.etcd.endpoint}"]\nprefix = "{self.prefix}"\n'
                         f'\n[cluster]\nhost = "{name}"\nunderlay = "{addr}"\nlease_ttl = {lease_ttl}\n')
                self.daemons[name] = Daemon(rootfs, strategy=strategy, driver=driver, subnet=subnet, facade=facade,
                                            port_base=port_base, netns=ns, extra=extra, ports=ports)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, host: str):
        return self.daemons[host]

    def start(self) -> None:
        for d in self.daemons.values():
            d.start()

    def close(self) -> None:
        for d in self.daemons.values():
            d.close()
        self.net.close()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
