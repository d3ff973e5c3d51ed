"""Test harness: an isolated tether-fused and real runc containers.

Every Daemon gets its own bridge, subnets, run_dir, state_dir, chain prefix
and runc root, and `close()` removes all of it (containers, processes by PID,
veths, bridge, chains, mounts, directories) even when a test failed.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TETHER = str(BIN / "tether")
FUSED = str(BIN / "tether-fused")
HOOK = str(BIN / "tether-hook")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def sh(*cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def build_rootfs(dest: Path) -> Path:
    """A busybox-static root: /bin with every applet, empty /etc/hosts."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = sh(str(dest / "bin" / "busybox"), "--list").stdout.split()
    for a in applets:
        link = dest / "bin" / a
        if not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "hosts").write_text("")
    (dest / "etc" / "resolv.conf").write_text("")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    return dest


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = sh("ip", "-4", "-o", "addr").stdout.split("\n")
    nets = []
    for line in out:
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    return nets


def free_subnet(prefix: int, first_octet_range: range, taken: list) -> str:
    used = _used_networks() + taken
    for _ in range(1000):
        net = ipaddress.IPv4Network(
            f"10.{random.choice(first_octet_range)}.{random.randrange(256)}.0/{prefix}", strict=False
        )
        if not any(net.overlaps(u) for u in used):
            taken.append(net)
            return str(net)
    raise RuntimeError("no free test subnet")


_TAKEN: list = []


class Daemon:
    """An isolated tether-fused with its own runc root."""

    def __init__(
        self,
        rootfs: Path,
        prefix: int = 24,
        extra: str = "",
        strategy: str = "direct",
        ports: int = 100,
        upstreams: list[str] = (),
        driver: str = "iptables",
        isolation: str = "none",
        subnet: str | None = None,
        facade: str | None = None,
        port_base: int | None = None,
        netns: str | None = None,
    ) -> None:
        """`subnet`, `facade`, `port_base`: the cluster's, shared by its hosts'
        daemons (else this daemon's own, free on this machine); `netns`: the
        network namespace it runs in (a "host" of tests/integration/cluster.py)."""
        tag = "%06x" % random.randrange(1 << 24)
        self.tag = tag
        self.dir = Path(tempfile.mkdtemp(prefix=f"tether-test-{tag}-"))
        self.rootfs = rootfs
        self.bridge = f"tb{tag}"
        self.chain_prefix = f"TT{tag.upper()}"
        self.driver = driver
        self.netns = netns
        self.subnet = subnet or free_subnet(prefix, range(100, 200), _TAKEN)
        self.facade = facade or free_subnet(20, range(200, 250), _TAKEN)
        self.run_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.runc_root = self.dir / "runc"
        self.config = self.dir / "tether.toml"
        self.port_base = port_base or 41000 + random.randrange(200) * 100
        self.config.write_text(
            f"""state_dir = "{self.state_dir}"
run_dir = "{self.run_dir}"

[network]
bridge = "{self.bridge}"
subnet = "{self.subnet}"
facade_subnet = "{self.facade}"
port_range = "{self.port_base}-{self.port_base + ports - 1}"
strategy = "{strategy}"
isolation = "{isolation}"

[firewall]
chain_prefix = "{self.chain_prefix}"
driver = "{driver}"

[dns]
upstreams = {json.dumps(list(upstreams))}
{extra}
"""
        )
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "fused.log"
        self.containers: set[str] = set()
        self.pids: set[int] = set()

    @property
    def nsenter(self) -> list[str]:
        """Its network namespace only (not its mounts: the FUSE mount must be
        the machine's, where runc binds it into containers)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []

    @property
    def gateway(self) -> str:
        return str(ipaddress.IPv4Network(self.subnet).network_address + 1)

    @property
    def sock(self) -> Path:
        return self.run_dir / "fused.sock"

    # --- daemon -----------------------------------------------------------
    def start(self, timeout: float = 15, args: tuple[str, ...] = ()) -> None:
        assert self.proc is None or self.proc.poll() is not None
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [*self.nsenter, FUSED, "--config", str(self.config), "--log-level", os.environ.get("TETHER_TEST_LOG", "info"),
             *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pids.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tether-fused exited {self.proc.returncode}:\n{self.log.read_text()}")
            if self.sock.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.sock))
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise AssertionError(f"tether-fused did not come up:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pid_of(self, which: str) -> int:
        """The pid in <run_dir>/fused.pid or fsd.pid."""
        return int((self.run_dir / f"{which}.pid").read_text())

    def kill9(self, which: str) -> int:
        """kill -9 tether-fused ("fused") or the file server ("fsd"); returns its pid."""
        pid = self.pid_of(which)
        self.pids.add(pid)
        os.kill(pid, signal.SIGKILL)
        if which == "fused" and self.proc is not None and self.proc.pid == pid:
            self.proc.wait()
            self.proc = None
        else:
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 10, what=f"pid {pid} to die")
        return pid

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(TETHER, "--config", str(self.config), *args, check=check)

    def cli_json(self, *args: str):
        return json.loads(self.cli("--json", *args).stdout)

    def container(self, name: str) -> dict:
        return self.cli_json("inspect", name)

    # --- runc ---------------------------------------------------------------
    def bundle(self, name: str, args: list[str], *patch_args: str, env: list[str] | None = None) -> Path:
        b = self.dir / "bundles" / name
        b.mkdir(parents=True, exist_ok=True)
        spec_dir = self.dir / "spec"
        if not (spec_dir / "config.json").exists():
            spec_dir.mkdir(exist_ok=True)
            sh("runc", "spec", cwd=spec_dir)
        spec = json.loads((spec_dir / "config.json").read_text())
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        spec["process"]["terminal"] = False
        spec["process"]["args"] = args
        spec["process"]["env"] = ["PATH=/bin", *(env or [])]
        spec["hostname"] = name
        # runc's default cgroup is /<id>: containers of the same name under
        # two test daemons would share one
        spec["linux"]["cgroupsPath"] = f"/tether-test-{self.tag}-{name}"
        (b / "config.json").write_text(json.dumps(spec, indent=2))
        self.cli("oci", "patch", str(b), "--name", name, *patch_args)
        return b

    def runc(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return sh("runc", "--root", str(self.runc_root), *args, check=check, timeout=timeout)

    def run(self, cid: str, bundle: Path, check: bool = True) -> subprocess.CompletedProcess:
        self.containers.add(cid)
        out = self.dir / f"{cid}.out"
        err = self.dir / f"{cid}.err"
        # the container inherits runc's stdio: files, never pipes we wait on
        with open(out, "ab") as fo, open(err, "wb") as fe:
            p = subprocess.run(
                ["runc", "--root", str(self.runc_root), "run", "-d", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                timeout=60,
            )
        p = subprocess.CompletedProcess(p.args, p.returncode, "", err.read_text(errors="replace"))
        if check and p.returncode != 0:
            raise AssertionError(f"runc run {cid} failed: {p.stderr}\n--- daemon log:\n{self.log.read_text()[-3000:]}")
        return p

    def start_container(self, name: str, args: list[str] | None = None, *patch_args: str, cid: str | None = None):
        args = args or serve(name)
        b = self.bundle(name, args, *patch_args)
        self.run(cid or name, b)
        return b

    def exec(self, cid: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.runc("exec", cid, *cmd, check=check, timeout=timeout)

    def state(self, cid: str) -> str | None:
        p = self.runc("state", cid, check=False)
        return json.loads(p.stdout)["status"] if p.returncode == 0 else None

    def kill(self, cid: str) -> None:
        """Stop a container the quick way (kill, wait, delete: runs poststop)."""
        if self.state(cid) in ("running", "created", "paused"):
            self.runc("kill", cid, "KILL", check=False)
            deadline = time.monotonic() + 10
            while self.state(cid) not in ("stopped", None) and time.monotonic() < deadline:
                time.sleep(0.01)
        self.runc("delete", "-f", cid, check=False)
        self.containers.discard(cid)

    # --- cleanup ------------------------------------------------------------
    def close(self) -> None:
        ids = set(self.containers)
        if self.runc_root.exists():
            p = self.runc("list", "-q", check=False)
            ids |= set(p.stdout.split())
        for cid in ids:
            self.kill(cid)
        self.stop()
        try:
            self.pids.add(self.pid_of("fsd"))
        except (OSError, ValueError):
            pass
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.netns or os.path.exists(f"/run/netns/{self.netns}"):
            sh(*self.nsenter, FUSED, "--config", str(self.config), "--cleanup", check=False)
        fs = self.run_dir / "fs"
        if os.path.ismount(fs):
            sh("umount", "-l", str(fs), check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def serve(name: str, port: int = 5432) -> list[str]:
    """A container process answering every TCP connection on `port` with its name."""
    return ["nc", "-ll", "-p", str(port), "-e", "echo", name]


def start_web_linked_to_db(d: Daemon) -> None:
    """db and db2 answering on 5432 with their names, web --link db:database."""
    d.start_container("db", serve("db"), "--expose", "5432")
    d.start_container("db2", serve("db2"), "--expose", "5432")
    d.start_container("web", ["sleep", "1000000"], "--link", "db:database")


def tcp_get(ip: str, port: int, timeout: float = 3.0) -> str:
    """From the host (test process): connect, read until EOF."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode()


def wait_for(pred, timeout: float = 10, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def bridge_ports(bridge: str) -> list[str]:
    out = sh("ip", "-o", "link", "show", "master", bridge, check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


def nft_dump(prefix: str) -> str:
    """tether's nftables table of `prefix` as nft lists it; "" when there is none."""
    return sh("nft", "list", "table", "inet", prefix, check=False).stdout


def firewall_dump(d) -> str:
    """What the kernel holds of daemon `d`'s firewall, in its driver's words."""
    return nft_dump(d.chain_prefix) if d.driver == "nftables" else iptables_dump(d.chain_prefix)


def firewall_state(d) -> list[str]:
    """Daemon `d`'s firewall in a canonical form, to compare two moments:
    sorted rules (and, for nftables, map elements), whatever order the
    kernel lists chains and elements in."""
    if d.driver != "nftables":
        return sorted(iptables_dump(d.chain_prefix).splitlines())
    p = sh("nft", "-j", "list", "table", "inet", d.chain_prefix, check=False)
    if p.returncode != 0:
        return []
    out = []
    for item in json.loads(p.stdout)["nftables"]:
        if "chain" in item:
            c = item["chain"]
            out.append(f"chain {c['name']} {c.get('hook', '')} {c.get('prio', '')}")
        elif "rule" in item:
            out.append(f"rule {item['rule']['chain']} {json.dumps(item['rule']['expr'], sort_keys=True)}")
        elif "map" in item:
            out.append(f"map {item['map']['name']}")
            out += [f"elem {item['map']['name']} {json.dumps(e, sort_keys=True)}" for e in item["map"].get("elem", [])]
    return sorted(out)


def forwards_host_port(d, port: int) -> bool:
    """A published-port rule (or map element) for host port `port` exists."""
    dump = firewall_dump(d)
    return f". {port} :" in dump if d.driver == "nftables" else f"--dport {port}" in dump


def dnats_to(d, ip: str) -> bool:
    """A facade group's DNAT to `ip` exists."""
    dump = firewall_dump(d)
    return f"dnat ip to {ip} " in dump if d.driver == "nftables" else f"-j DNAT --to-destination {ip}" in dump


def iptables_dump(prefix: str) -> str:
    return "\n".join(
        line
        for table in ("nat", "filter")
        for line in sh("iptables-legacy", "-t", table, "-S").stdout.splitlines()
        if prefix in line
    )


def enter_netns(pid: int) -> None:
    """Move the calling thread into the network namespace of `pid` (for good:
    a thread made for it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def in_netns(pid: int, fn, *args):
    """Run fn(*args) on a thread that entered the network namespace of `pid`
    (so its packets come from that container's address); return its result."""
    import threading

    box: dict = {}

    def run():
        enter_netns(pid)
        try:
            box["r"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


def address_in_hosts(hosts: str, alias: str) -> str:
    """The address a hosts file gives `alias` (first name on its line)."""
    for line in hosts.splitlines():
        addr, names = line.split("\t")
        if names.split()[0] == alias:
            return addr
    raise AssertionError(f"{alias} not in hosts:\n{hosts}")


def host_port(published: str) -> int:
    """The host port of a published port as tether prints it (`0.0.0.0:40000->5432/tcp`)."""
    host, arrow, _ = published.partition("->")
    assert arrow and host.startswith("0.0.0.0:"), published
    return int(host.removeprefix("0.0.0.0:"))
