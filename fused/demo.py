"""`tether demo` (`make demo`): a guided run with real runc containers.

Everything lives under one temporary directory with its own config (bridge,
subnets, host ports, chains, run_dir), and everything is removed at the end,
also on a failure or Ctrl-C. Network traffic goes only to 127.0.0.1 and to
the demo's own containers; DNS forwarding is off (`upstreams = []`).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import model

BIN = Path(sys.executable).parent
TETHER, FUSED = str(BIN / "tether"), str(BIN / "tether-fused")
NAMES = ("db", "db2", "web")


class Failed(Exception):
    pass


class Interrupted(BaseException):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def sh(cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise Failed(f"`{' '.join(cmd)}` did not finish within {timeout:g} s") from None
    if check and p.returncode != 0:
        why = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise Failed(f"`{' '.join(cmd)}` exited {p.returncode}: {why}")
    return p


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has an address in or a route to."""
    nets = []
    for line in sh(["ip", "-4", "-o", "addr"], check=False).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in sh(["ip", "-4", "route"], check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else "default"
        if first != "default":
            nets.append(ipaddress.IPv4Network(first, strict=False))
    return nets


def _free_subnet(taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    # 10.20-99: clear of the test harness (10.100-249) and of the defaults (10.213/10.214)
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{random.randrange(20, 100)}.{random.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in taken):
            taken.append(net)
            return net
    raise Failed("no free 10.x /24 subnet on this host")


def _free_port_base() -> int:
    """100 host ports above the kernel's ephemeral range that no NAT rule and no listener uses."""
    # ports other tools forward (legacy iptables, nftables: docker, podman, another tether)
    nat = "".join(sh([*cmd], check=False).stdout for cmd in (["iptables-legacy-save", "-t", "nat"], ["nft", "list", "ruleset"])
                  if shutil.which(cmd[0]))
    used = {int(p) for p in re.findall(r"(?:--dports?|dport|\. ) ?(\d+)", nat)}
    for _ in range(100):
        base = random.randrange(61000, 65400, 100)
        if used & set(range(base, base + 100)):
            continue
        try:
            for port in range(base, base + 100):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise Failed("no free block of 100 host ports in 61000-65499")


class Demo:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tether-demo-"))
        self.run_dir = self.dir / "run"  # short: fused.sock must fit AF_UNIX's 107 bytes
        self.runc_root = self.dir / "runc"
        self.config = self.dir / "tether.toml"
        self.log = self.dir / "fused.log"
        self.rootfs = self.dir / "rootfs"
        tag = "%04x" % random.randrange(1 << 16)
        self.bridge, self.chain_prefix = f"tdemo{tag}", f"TDEMO{tag.upper()}"
        self.proc: subprocess.Popen | None = None
        self.loop: subprocess.Popen | None = None  # step 10's reader loop in web (a `runc exec`)
        self.started: list[str] = []
        self.step = "setting up"

    # --- printing ---------------------------------------------------------
    def short(self, text: str) -> str:
        return text.replace(str(self.dir), "$D")

    def heading(self, n: int, title: str) -> None:
        self.step = f"step {n} ({title})"
        print(f"\n[{n}] {title}")

    def say(self, text: str) -> None:
        print("    " + self.short(text))

    def output(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines() or ["(empty)"]:
            print("        " + self.short(line))

    def shown(self, cmd: list[str], display: str | None = None, check: bool = True, only: str | None = None) -> str:
        """Print `$ cmd`, run it, print its output (or its lines containing `only`) indented."""
        self.say("$ " + (display or " ".join(cmd)))
        p = sh(cmd, check=False)
        text = p.stdout + (p.stderr if p.returncode != 0 else "")
        if only is not None and p.returncode == 0:
            text = "".join(line.strip() + "\n" for line in text.splitlines() if only in line) + "(other fields left out)"
        if text.strip():
            self.output(text)
        if check and p.returncode != 0:
            why = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
            raise Failed(f"`{self.short(display or ' '.join(cmd))}` exited {p.returncode}: {self.short(why)}")
        return p.stdout

    # --- tools ------------------------------------------------------------
    def tether(self, *args: str) -> str:
        return self.shown([TETHER, "--config", str(self.config), *args], "tether --config $D/tether.toml " + " ".join(args))

    def tether_json(self, *args: str):
        return json.loads(sh([TETHER, "--config", str(self.config), "--json", *args]).stdout)

    def runc_cmd(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.runc_root), *args]

    def runc(self, *args: str, check: bool = True, only: str | None = None) -> str:
        return self.shown(self.runc_cmd(*args), "runc --root $D/runc " + " ".join(args), check=check, only=only)

    def state(self, name: str) -> dict | None:
        p = sh(self.runc_cmd("state", name), check=False)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait_not_running(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state(name)
            if st is None or st["status"] not in ("running", "created", "paused"):
                return
            time.sleep(0.05)

    def run_container(self, name: str) -> None:
        bundle = self.dir / "bundles" / name
        self.say(f"$ runc --root $D/runc run -d --bundle $D/bundles/{name} {name}")
        self.started.append(name)
        # the container inherits runc's stdio: a file, never a pipe we would wait on
        with open(self.dir / f"{name}.out", "ab") as out:
            try:
                rc = subprocess.run(self.runc_cmd("run", "-d", "--bundle", str(bundle), name),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60).returncode
            except subprocess.TimeoutExpired:
                raise Failed(f"`runc run {name}` did not finish within 60 s") from None
        if rc != 0:
            lines = (self.dir / f"{name}.out").read_text(errors="replace").strip().splitlines()
            raise Failed(f"`runc run {name}` exited {rc}: {self.short(lines[-1] if lines else 'no output')}")

    def ask(self, container: str, alias: str, expect: str) -> None:
        """From inside `container`: connect to alias:5432 and read the answer."""
        cmd = self.runc_cmd("exec", container, "nc", "-w", "3", alias, "5432")
        self.say(f"$ runc --root $D/runc exec {container} nc -w 3 {alias} 5432")
        got = self.until(lambda: sh(cmd, check=False, timeout=15).stdout.strip(), expect)
        self.output(got)
        if got != expect:
            raise Failed(f"{container} asked {alias}:5432 and got {got!r}, not {expect!r}")

    def ask_host_port(self, port: int, expect: str) -> None:
        self.say(f"(from the host) connect to 127.0.0.1:{port}, read until EOF")

        def get() -> str:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
                    s.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                return data.decode(errors="replace").strip()
            except OSError as e:
                return f"error: {e}"

        got = self.until(get, expect)
        self.output(got)
        if got != expect:
            raise Failed(f"127.0.0.1:{port} answered {got!r}, not {expect!r}")

    @staticmethod
    def until(fn, expect: str, timeout: float = 5.0) -> str:
        """A just-started listener may need a moment: retry until it answers."""
        deadline = time.monotonic() + timeout
        while True:
            got = fn()
            if got == expect or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def published(self, name: str) -> tuple[str, int]:
        c = self.tether_json("inspect", name)
        if not c.get("published"):
            raise Failed(f"{name} has no published host port (tether inspect {name}: {c.get('published')})")
        return c["ip"], model.Published.parse(c["published"][0]).host_port

    # --- the steps ----------------------------------------------------------
    def setup(self) -> None:
        self.heading(1, "An isolated setup: its own config, bridge, subnets, host ports and chains")
        taken = _used_networks()
        subnet, facade = _free_subnet(taken), _free_subnet(taken)
        base = _free_port_base()
        self.config.write_text(
            f'state_dir = "{self.dir / "state"}"\nrun_dir = "{self.run_dir}"\n\n'
            f'[network]\nbridge = "{self.bridge}"\nsubnet = "{subnet}"\nfacade_subnet = "{facade}"\n'
            f'port_range = "{base}-{base + 99}"\nstrategy = "facade"\n\n'
            f'[firewall]\nchain_prefix = "{self.chain_prefix}"\n\n'
            "[dns]\nupstreams = []   # the demo never forwards DNS queries\n"
        )
        print(f"    D={self.dir}   (every path below is under it)")
        self.say(f"$ cat {self.config}")
        self.output(self.config.read_text())
        busybox = shutil.which("busybox")
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
            (self.rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, self.rootfs / "bin" / "busybox")
        applets = sh([busybox, "--list"]).stdout.split()
        for a in applets:
            if not (self.rootfs / "bin" / a).exists():
                (self.rootfs / "bin" / a).symlink_to("busybox")
        (self.rootfs / "etc" / "hosts").write_text("")
        (self.rootfs / "etc" / "resolv.conf").write_text("")
        self.say(f"root filesystem $D/rootfs: {busybox} with its {len(applets)} applets, an empty /etc/hosts")

    def start_daemon(self) -> None:
        self.heading(2, "Start the daemon")
        self.launch()

    def launch(self) -> None:
        """Start tether-fused in the background and wait until its control socket answers."""
        self.say("$ tether-fused --config $D/tether.toml &    (log: $D/fused.log)")
        with open(self.log, "ab") as logf:  # its own session: a Ctrl-C reaches the demo, which stops it in order
            self.proc = subprocess.Popen([FUSED, "--config", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        sock = self.run_dir / "fused.sock"
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                print(self.log.read_text(errors="replace"), end="")
                how = f"exited {self.proc.returncode}" if self.proc.poll() is not None else "is not up after 15 s"
                raise Failed(f"tether-fused {how} (its log is above)")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                break
            except OSError:
                time.sleep(0.05)
        self.output(f"ready on $D/run/fused.sock (pid {self.proc.pid}); bridge {self.bridge}")

    def containers(self) -> None:
        self.heading(3, "Three busybox containers: db, its stand-by db2, and web linked to db as `database`")
        spec_dir = self.dir / "spec"
        spec_dir.mkdir()
        self.say("$ runc spec    (in $D/spec: a template; each bundle gets root $D/rootfs read-only, its args,")
        self.say(f"               PATH=/bin, hostname NAME, cgroupsPath /{self.bridge}-NAME)")
        sh(["runc", "spec"], cwd=spec_dir)
        template = json.loads((spec_dir / "config.json").read_text())
        plan = {
            "db": (["nc", "-ll", "-p", "5432", "-e", "echo", "hello from db"], ["--expose", "5432", "--publish", "5432"]),
            "db2": (["nc", "-ll", "-p", "5432", "-e", "echo", "hello from db2"], ["--expose", "5432"]),
            "web": (["sleep", "1000000"], ["--link", "db:database"]),
        }
        for name, (args, flags) in plan.items():
            print()
            self.say(f"# {name}: {' '.join(args)}")
            bundle = self.dir / "bundles" / name
            bundle.mkdir(parents=True)
            spec = json.loads(json.dumps(template))
            spec["root"] = {"path": str(self.rootfs), "readonly": True}
            spec["process"].update(terminal=False, args=args, env=["PATH=/bin"])
            spec["hostname"] = name
            # a cgroup of its own: runc's default (/<id>) is shared by every runc root using that id
            spec["linux"]["cgroupsPath"] = f"/{self.bridge}-{name}"
            (bundle / "config.json").write_text(json.dumps(spec, indent=2))
            self.tether("oci", "patch", str(bundle), "--name", name, *flags)
            self.run_container(name)

    def listings(self) -> None:
        self.heading(4, "What tether knows")
        self.tether("ps")
        self.tether("link", "ls")

    def from_web(self) -> None:
        self.heading(5, "web reads its /etc/hosts and connects to `database`")
        self.runc("exec", "web", "cat", "/etc/hosts")
        self.ask("web", "database", "hello from db")

    def host_port(self) -> int:
        self.heading(6, "db's published port, from the host")
        c = self.tether_json("inspect", "db")
        self.say("$ tether --config $D/tether.toml --json inspect db    (the field \"published\")")
        self.output(json.dumps(c.get("published")))
        _, port = self.published("db")
        self.ask_host_port(port, "hello from db")
        return port

    def restart(self) -> None:
        self.heading(7, "Stop and start db: it keeps its address and its host port")
        ip0, port0 = self.published("db")
        self.runc("kill", "db", "KILL")
        self.wait_not_running("db", 10)
        self.runc("state", "db", check=False, only='"status"')
        self.runc("delete", "db")
        self.tether("ps", "-a")  # stopped, still known
        self.run_container("db")
        ip1, port1 = self.published("db")
        self.say(f"db before: {ip0}, host port {port0}")
        self.say(f"db after:  {ip1}, host port {port1}")
        if (ip0, port0) != (ip1, port1):
            raise Failed(f"db came back with {ip1}:{port1}, not {ip0}:{port0}")
        self.say("same address, same host port")
        self.ask("web", "database", "hello from db")

    def failover(self, port: int) -> None:
        self.heading(8, "Failover: move everything from db to db2, while web keeps running")
        pid0 = (self.state("web") or {}).get("pid")
        self.say(f"web's pid before: {pid0}   (runc state web)")
        self.tether("move", "db", "db2")
        self.runc("exec", "web", "cat", "/etc/hosts")
        self.say("`database` now names db2, at the same (facade) address: only the rule behind it changed")
        self.ask("web", "database", "hello from db2")
        self.ask_host_port(port, "hello from db2")
        self.tether("link", "ls")
        st = self.state("web") or {}
        self.say(f"web's pid after:  {st.get('pid')}   ({st.get('status')})")
        if st.get("pid") != pid0 or st.get("status") != "running":
            raise Failed(f"web was restarted or stopped: pid {pid0} before, {st.get('pid')} ({st.get('status')}) after")
        self.say("web was not restarted: same process, and its next read of /etc/hosts and its next connection saw db2")

    def srv(self) -> None:
        self.heading(9, "DNS: the same link by name (A) and its ports (SRV), answered by tether's DNS process")
        self.runc("exec", "web", "cat", "/etc/resolv.conf")
        out = self.runc("exec", "web", "nslookup", "database")
        if "Address:" not in out.split("Name:", 1)[-1]:
            raise Failed("web's DNS lookup of `database` got no address")
        out = self.runc("exec", "web", "nslookup", "-type=srv", "_database._tcp")
        if "0 0 5432 database" not in out:
            raise Failed("web's SRV lookup of _database._tcp did not list port 5432")
        self.say("each container gets the answers of its own links; TTL 0, so a retarget shows at once")

    # step 10: web's reads of /etc/hosts, in a loop (ash builtins but cat and grep; /dev/shm is web's own tmpfs)
    READER = (
        "n=0; f=0\n"
        "while [ ! -e /dev/shm/stop ]; do\n"
        "  cat /etc/hosts >/dev/null || { echo FAIL cat; f=$((f+1)); }\n"
        "  grep -q database /etc/hosts || { echo FAIL grep; f=$((f+1)); }\n"
        "  n=$((n+1)); echo $n >/dev/shm/n\n"
        "done\n"
        'echo "$n rounds, $f failed"'
    )

    def pid_file(self, name: str) -> int | None:
        try:
            return int((self.run_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def rounds(self) -> int:
        """How many rounds web's reader loop has done so far (it writes the count to its /dev/shm/n)."""
        out = sh(self.runc_cmd("exec", "web", "cat", "/dev/shm/n"), check=False, timeout=15).stdout.strip()
        return int(out) if out.isdigit() else 0

    def kill_daemon(self) -> None:
        self.heading(10, "kill -9 tether-fused while web reads its /etc/hosts in a loop, then start it again")
        fused0, fsd0 = self.pid_file("fused.pid"), self.pid_file("fsd.pid")
        if self.proc is None or fused0 != self.proc.pid or fsd0 is None:
            raise Failed(f"$D/run/fused.pid says {fused0} (the demo started {self.proc and self.proc.pid}), $D/run/fsd.pid {fsd0}")
        self.say(f"tether-fused: pid {fused0} ($D/run/fused.pid); the file server answering $D/run/fs: pid {fsd0} ($D/run/fsd.pid)")
        self.say("$ runc --root $D/runc exec web sh -c \"$READER\" &    where READER is")
        self.output(self.READER)
        self.loop = subprocess.Popen(self.runc_cmd("exec", "web", "sh", "-c", self.READER), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 10
        while (n0 := self.rounds()) == 0:
            if self.loop.poll() is not None or time.monotonic() > deadline:
                raise Failed("web's reader loop did not start" + (f" (exited {self.loop.returncode})" if self.loop.poll() is not None else ""))
            time.sleep(0.05)
        self.say(f"$ kill -9 {fused0}    (after {n0} rounds)")
        os.kill(fused0, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            raise Failed(f"tether-fused {fused0} still runs 5 s after SIGKILL") from None
        time.sleep(1)
        n1 = self.rounds()
        alive = self._is_our_file_server(fsd0)
        self.say(f"1 s later: tether-fused is gone, file server {fsd0} {'still runs' if alive else 'is GONE'}; "
                 f"web did {n1 - n0} more rounds meanwhile")
        self.say("(web's DNS server, on the gateway, is a process of its own: it keeps answering meanwhile)")
        self.launch()
        took = [line for line in self.log.read_text(errors="replace").splitlines() if "served files:" in line]
        self.output(took[-1] if took else "(no `served files:` line in $D/fused.log)")
        time.sleep(0.3)  # a few more rounds against the restarted daemon
        sh(self.runc_cmd("exec", "web", "touch", "/dev/shm/stop"), timeout=15)
        self.say("$ runc --root $D/runc exec web touch /dev/shm/stop    (the loop ends; its output:)")
        try:
            out, _ = self.loop.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise Failed("web's reader loop did not stop within 15 s of /dev/shm/stop") from None
        self.output(out)
        lines = out.strip().splitlines()
        m = re.fullmatch(r"(\d+) rounds, (\d+) failed", lines[-1] if lines else "")
        fails = sum(1 for line in lines if line.startswith("FAIL"))
        if m is None or self.loop.returncode != 0:
            raise Failed(f"web's reader loop exited {self.loop.returncode} with {lines[-1] if lines else 'no output'!r}")
        total = int(m.group(1))
        self.say(f"{total} rounds = {2 * total} reads of /etc/hosts (cat, and grep for `database`): "
                 f"{fails} FAIL lines, {int(m.group(2))} failed")
        fsd1 = self.pid_file("fsd.pid")
        self.say(f"file server pid before: {fsd0}, after: {fsd1}   ($D/run/fsd.pid)")
        if fails or int(m.group(2)) or lines[:-1]:
            raise Failed(f"web's reads of /etc/hosts failed while tether-fused was killed and restarted: {lines[:-1]}")
        if fsd1 != fsd0:
            raise Failed(f"the file server changed from {fsd0} to {fsd1}: it should have kept serving")
        out = self.runc("exec", "web", "nslookup", "database")
        if "Address:" not in out.split("Name:", 1)[-1]:
            raise Failed("after the restart, web's DNS lookup of `database` got no address")
        self.say("no read failed: the file server kept answering; the new tether-fused took its connection over")

    def _is_our_file_server(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"fused.fs.server" in argv and str(self.run_dir).encode() in argv

    def cleanup(self) -> list[str]:
        """Remove everything; returns what could not be removed."""
        ids = [n for n in ("web", "db2", "db") if n in self.started]
        if self.runc_root.exists():
            ids += [i for i in sh(self.runc_cmd("list", "-q"), check=False).stdout.split() if i not in ids]
        for name in ids:
            sh(self.runc_cmd("kill", name, "KILL"), check=False)
            self.wait_not_running(name, 5)
            sh(self.runc_cmd("delete", "-f", name), check=False)
        if ids:
            print(f"    removed containers {', '.join(ids)}")
        if self.loop is not None and self.loop.poll() is None:  # its sh died with web; runc exec follows
            try:
                self.loop.wait(5)
            except subprocess.TimeoutExpired:
                self.loop.kill()
                self.loop.wait()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            print(f"    stopped tether-fused (pid {self.proc.pid})")
        fsd = self.pid_file("fsd.pid")  # --cleanup stops it; the check below makes sure
        if self.config.exists():
            sh([FUSED, "--config", str(self.config), "--cleanup"], check=False)
            print(f"    $ tether-fused --config $D/tether.toml --cleanup    (bridge {self.bridge}, "
                  f"veths, chains {self.chain_prefix}-*, FUSE mount)")
        if fsd is not None and self._is_our_file_server(fsd):
            os.kill(fsd, signal.SIGKILL)
            print(f"    killed file server {fsd} (--cleanup had not stopped it)")
            time.sleep(0.2)
        if os.path.ismount(self.run_dir / "fs"):
            sh(["umount", "-l", str(self.run_dir / "fs")], check=False)
        left = []
        if fsd is not None and self._is_our_file_server(fsd):
            left.append(f"file server {fsd}")
        if self.runc_root.exists() and sh(self.runc_cmd("list", "-q"), check=False).stdout.strip():
            left.append("runc containers")
        if sh(["ip", "link", "show", self.bridge], check=False).returncode == 0:
            left.append(f"bridge {self.bridge}")
        from .net import firewall as fw_mod

        for driver in ("nftables", "iptables"):
            try:
                if fw_mod.make(driver, self.chain_prefix).dump():
                    left.append(f"{driver} rules of {self.chain_prefix}")
            except fw_mod.FirewallError:
                pass  # that driver cannot work here, so it made nothing
        if list(Path("/sys/fs/cgroup").glob(f"*/{self.bridge}-*")) + list(Path("/sys/fs/cgroup").glob(f"{self.bridge}-*")):
            left.append(f"cgroups /{self.bridge}-*")
        if str(self.dir) in Path("/proc/self/mounts").read_text():
            left.append(f"a mount under {self.dir}")
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            left.append(str(self.dir))
        else:
            print(f"    removed {self.dir}")
        return left


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="tether demo",
        description="A guided run with real runc containers (db, db2, web) on an isolated, temporary setup. Root only.",
    ).parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if os.geteuid() != 0:
        print("tether demo: must run as root (it starts a daemon and runc containers)", file=sys.stderr)
        return 1
    missing = [t for t in ("runc", "busybox", "ip") if not shutil.which(t)]
    if missing or not Path(FUSED).exists():
        print(f"tether demo: missing {', '.join(missing) or FUSED}: run `make demo`, which installs it", file=sys.stderr)
        return 1
    print("tether demo: sticky addresses and links that follow, with real runc containers")
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    demo, status = None, 1
    try:
        demo = Demo()
        demo.setup()
        demo.start_daemon()
        demo.containers()
        demo.listings()
        demo.from_web()
        port = demo.host_port()
        demo.restart()
        demo.failover(port)
        demo.srv()
        demo.kill_daemon()
        status = 0
    except Failed as e:
        print(f"\ndemo FAILED at {demo.step if demo else 'setup'}: {demo.short(str(e)) if demo else e}", flush=True)
    except Interrupted as e:
        print(f"\ndemo interrupted ({e}) at {demo.step if demo else 'setup'}", flush=True)
    except Exception as e:  # a bug: still clean up, and say where
        print(f"\ndemo FAILED at {demo.step if demo else 'setup'}: {type(e).__name__}: {e}", flush=True)
    finally:
        for s in old:  # cleanup must not be cut short by a second Ctrl-C
            signal.signal(s, signal.SIG_IGN)
        if demo is not None:
            print("\n[11] Clean up")
            left = demo.cleanup()
            if left:
                print(f"demo cleanup left behind: {', '.join(left)}")
                status = 1
            else:
                print("\ndemo finished; everything it made is removed" if status == 0
                      else "\ndemo stopped early; everything it made is removed")
        for s, h in old.items():
            signal.signal(s, h)
    return status


if __name__ == "__main__":
    sys.exit(main())
