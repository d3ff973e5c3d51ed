"""tether doctor: check what tether needs, one line per check, with the fix.

    ok    bridge        tether0 is up with 10.213.0.1/16
    FAIL  daemon        no socket at /run/tether/fused.sock: start it with ...

Every check is read-only and bounded: subprocesses and the control socket get
a 2 s timeout, and each check runs on a thread of its own that the doctor
stops waiting for after CHECK_TIMEOUT. Anything that touches the FUSE mount
(which a dead or stuck daemon can make hang) runs in a child process that a
timeout kills. The kernel features are tried in a throwaway network namespace
(`unshare -n`), which leaves nothing behind.

A check is "ok", "warn" (usable, but worth knowing) or "fail". The exit
status is 0 iff no check failed.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config as config_mod
from . import container_files as cf
from .model import overlay_name
from .fs.session import KEEPER_NAME, file_server_pid, keeper_pid, mounts_at, read_pid
from .protocol import DaemonError, Unreachable, request

OK, WARN, FAIL = "ok", "warn", "fail"
LABELS = {OK: "ok", WARN: "warn", FAIL: "FAIL"}
NAME_WIDTH = 14
CMD_TIMEOUT = 2.0  # s, per subprocess and per socket request
CHECK_TIMEOUT = 5.0  # s, per check
PROBE_NAME = "doctor-probe"  # a valid name: its directory exists whether registered or not
START = "start it with `systemctl start tether-fused` or `tether-fused --config FILE`"
TIMEOUTS = {"containers": cf.BUDGET + 2.0}  # s: checks allowed longer than CHECK_TIMEOUT (it bounds its reads itself)
LISTED = 5  # names a line lists before "and N more"


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        """Usable: a warning is."""
        return self.status != FAIL

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "status": self.status, "detail": self.detail, "fix": self.fix}


# --- output ------------------------------------------------------------------
def line(r: Result) -> str:
    text = f"{LABELS[r.status]:<6}{r.name:<{NAME_WIDTH}}{r.detail}"
    return f"{text}: {r.fix}" if r.fix and r.status != OK else text


def summary(results: list[Result]) -> str:
    n = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL)}
    counts = f"{len(results)} checks: {n[OK]} ok, {n[WARN]} warn, {n[FAIL]} failed"
    if n[FAIL]:
        return f"{counts}: tether is not usable until the FAIL lines are fixed"
    return f"{counts}: tether is usable" + (" (see the warn lines)" if n[WARN] else "")


def render(results: list[Result], as_json: bool) -> str:
    if as_json:
        return json.dumps([r.as_dict() for r in results], indent=2)
    return "\n".join([line(r) for r in results] + [summary(results)])


def exit_code(results: list[Result]) -> int:
    return 0 if all(r.ok for r in results) else 1


# --- helpers -------------------------------------------------------------------
@dataclass
class Ran:
    rc: int | None  # None: not found or timed out (see err)
    out: str
    err: str


def run_cmd(cmd: list[str], timeout: float = CMD_TIMEOUT) -> Ran:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return Ran(None, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Ran(None, "", f"`{' '.join(cmd)}` did not finish within {timeout:g} s")
    except OSError as e:
        return Ran(None, "", f"{cmd[0]}: {e.strerror or e}")
    return Ran(p.returncode, p.stdout, p.stderr)


def first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def guarded(name: str, fn: Callable[[], Result], timeout: float = CHECK_TIMEOUT) -> Result:
    """fn() on a thread of its own; a check that hangs or crashes is a FAIL line."""
    box: dict = {}

    def target() -> None:
        try:
            box["r"] = fn()
        except Exception as e:  # noqa: BLE001 - reported as a line
            box["e"] = e

    t = threading.Thread(target=target, name=f"doctor-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return Result(name, FAIL, f"the check did not finish within {timeout:g} s", "something it reads hangs: see the other lines")
    if "e" in box:
        e = box["e"]
        return Result(name, FAIL, f"the check crashed: {type(e).__name__}: {e}", "a tether bug: report this line")
    return box["r"]


def iptables_backend(version_output: str) -> str | None:
    """'nf_tables', 'legacy' or None from `iptables -V`."""
    m = re.search(r"\((nf_tables|legacy)\)", version_output)
    return m.group(1) if m else None


def listeners(ss_output: str, port: int) -> list[tuple[str, str, str]]:
    """(proto, address, process) of every listening socket on `port` in
    `ss -Hlnptu` output."""
    out = []
    for ln in ss_output.splitlines():
        f = ln.split()
        if len(f) < 5:
            continue
        addr, _, p = f[4].rpartition(":")
        if p != str(port):
            continue
        addr = addr.split("%")[0].strip("[]")
        proc = ""
        m = re.search(r'users:\(\("([^"]+)"', ln)
        if m:
            proc = m.group(1)
        out.append((f[0], addr, proc))
    return out


def names(findings: list[cf.Finding]) -> str:
    shown = ", ".join(f.name for f in findings[:LISTED])
    return shown + (f" and {len(findings) - LISTED} more" if len(findings) > LISTED else "")


def containers_result(findings: list[cf.Finding], source: str) -> Result:
    """The doctor's line for the running containers' files: FAIL naming those
    whose files are dead or stale, WARN for those whose /etc/hosts is not
    tether's or that were not checked."""
    bad = [f for f in findings if f.state in cf.PROBLEMS]
    if bad:
        first = bad[0]
        states = " or ".join(s for s in cf.PROBLEMS if any(f.state == s for f in bad))
        detail = f"{len(bad)} running container(s) with {states} served files: {names(bad)} ({first.name}: {first.detail})"
        if len(bad) == 1:
            return Result("containers", FAIL, detail, first.fix)
        mount = "restart tether-fused first (the mount fails too: see the mount line), then " if any(
            f.mount_dead for f in bad) else ""
        return Result("containers", FAIL, detail, f"{mount}restart each of them (`tether ps` prints the command for "
                      f"each); {first.name}: {first.fix}")
    foreign = [f for f in findings if f.state == cf.NOT_TETHERS]
    if foreign:
        return Result("containers", WARN, f"{len(foreign)} running container(s) without tether's /etc/hosts: "
                      f"{names(foreign)} ({foreign[0].name}: {foreign[0].detail})", foreign[0].fix)
    unchecked = [f for f in findings if f.state == cf.UNCHECKED]
    if unchecked:
        return Result("containers", WARN, f"{len(unchecked)} running container(s) not checked: {names(unchecked)} "
                      f"({unchecked[0].detail})", unchecked[0].fix)
    ok = [f for f in findings if f.state == cf.OK]
    if not ok:
        return Result("containers", OK, f"no running container to check ({source})")
    return Result("containers", OK, f"{len(ok)} running container(s) read what tether serves: "
                  f"{', '.join(s.path for s in cf.SERVED)} from inside each ({source})")


# --- the checks ------------------------------------------------------------------
class Doctor:
    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        from .net import firewall as fw_mod

        self.driver = fw_mod.choose(cfg.firewall.driver)  # "auto" as tether-fused resolves it here
        self.uses_iptc = self.driver == "iptables"

    def checks(self) -> list[tuple[str, Callable[[], Result]]]:
        return [
            ("user", self.user),
            ("kernel-fuse", self.kernel_fuse),
            ("dev-fuse", self.dev_fuse),
            ("fusermount3", self.fusermount3),
            ("kernel-veth", self.kernel_veth),
            ("kernel-bridge", self.kernel_bridge),
            ("kernel-nat", self.kernel_nat),
            ("iptables", self.iptables),
            ("forwarding", self.forwarding),
            ("bridge", self.bridge),
            ("daemon", self.daemon),
            ("store", self.store),
            ("overlay", self.overlay),
            ("mount", self.mount),
            ("file-server", self.file_server),
            ("containers", self.containers),
            ("firewall", self.firewall),
            ("isolation", self.isolation),
            ("dns", self.dns),
            ("conntrack", self.conntrack),
            ("podman-hooks", self.podman_hooks),
            ("drift", self.drift),
        ]

    def run(self) -> list[Result]:
        return [guarded(name, fn, TIMEOUTS.get(name, CHECK_TIMEOUT)) for name, fn in self.checks()]

    # kernel and host ------------------------------------------------------------
    def user(self) -> Result:
        uid = os.geteuid()
        if uid == 0:
            return Result("user", OK, "root")
        return Result(
            "user", FAIL, f"uid {uid}: tether's socket, store, FUSE and firewall checks need root", "run `sudo tether doctor`"
        )

    def kernel_fuse(self) -> Result:
        try:
            fss = Path("/proc/filesystems").read_text().split()
        except OSError as e:
            return Result("kernel-fuse", FAIL, f"cannot read /proc/filesystems: {e.strerror}", "mount /proc")
        if "fuse" in fss:
            return Result("kernel-fuse", OK, "fuse is in /proc/filesystems")
        return Result(
            "kernel-fuse", FAIL, "the kernel has no fuse filesystem", "`modprobe fuse` (a kernel with CONFIG_FUSE_FS)"
        )

    def dev_fuse(self) -> Result:
        path = "/dev/fuse"
        fix = "`mknod -m 0666 /dev/fuse c 10 229` (in a container: give it the device, e.g. --device /dev/fuse)"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Result("dev-fuse", FAIL, f"no {path}", fix)
        if not stat.S_ISCHR(st.st_mode):
            return Result("dev-fuse", FAIL, f"{path} is not a character device", fix)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))  # no mount: nothing happens
        except OSError as e:
            return Result("dev-fuse", FAIL, f"cannot open {path}: {e.strerror}", "run as root; in a container, allow the device (cgroup)")
        return Result("dev-fuse", OK, f"{path} is a character device ({os.major(st.st_rdev)}:{os.minor(st.st_rdev)}) and opens")

    def fusermount3(self) -> Result:
        found = shutil.which("fusermount3")
        if found:
            return Result("fusermount3", OK, f"{found} (not needed: tether mounts with mount(2) as root)")
        return Result(
            "fusermount3",
            WARN,
            "not on PATH; tether does not need it (it mounts with mount(2) as root)",
            "optional: `apt-get install fuse3`, for `fusermount3 -u` by hand",
        )

    def _in_netns(self, name: str, script: str, what: str, fix: str) -> Result:
        # a new, empty network namespace: whatever the script creates dies with it
        cmd = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        r = run_cmd(cmd + ["sh", "-c", script])
        if r.rc == 0:
            return Result(name, OK, f"created a {what} in a throwaway network namespace")
        why = first_line(r.err) or f"exit status {r.rc}"
        if r.rc is None and "unshare" in r.err:
            return Result(name, FAIL, f"cannot try a {what}: {why}", "install util-linux (unshare)")
        return Result(name, FAIL, f"cannot create a {what} ({why})", fix)

    def kernel_veth(self) -> Result:
        return self._in_netns(
            "kernel-veth", "ip link add name dva type veth peer name dvb", "veth pair", "`modprobe veth` (CONFIG_VETH); install iproute2"
        )

    def kernel_bridge(self) -> Result:
        return self._in_netns(
            "kernel-bridge", "ip link add name dbr type bridge", "bridge", "`modprobe bridge` (CONFIG_BRIDGE); install iproute2"
        )

    def kernel_nat(self) -> Result:
        from .net import firewall as fw_mod

        if self.driver == "none":
            return Result("kernel-nat", OK, "not used (firewall driver none)")
        try:
            f = fw_mod.make(self.driver, self.cfg.firewall.chain_prefix)
        except fw_mod.FirewallError as e:
            return Result("kernel-nat", FAIL, str(e).split(": ", 1)[-1], "see the fix above; `tether doctor` again")
        if self.driver == "nftables":
            return Result("kernel-nat", OK, f"nftables (libnftables) answers; driver {self.cfg.firewall.driver} -> nftables")
        ok, msg, fix = f.check()
        if not ok and msg.startswith("cannot read"):
            return Result("kernel-nat", FAIL, msg, fix)
        return Result("kernel-nat", OK, f"python-iptables reads the legacy tables; driver {self.cfg.firewall.driver} -> iptables")

    def iptables(self) -> Result:
        driver = self.driver
        if driver == "nftables":
            p = self.cfg.firewall.chain_prefix
            return Result("iptables", OK, f"firewall driver nftables: tether's rules are in `nft list table inet {p}`; "
                          "the host's `iptables -S` does not show them (it lists only its own ip tables)")
        if driver != "iptables":
            return Result("iptables", OK, f"firewall driver {driver}: tether writes no iptables rules")
        r = run_cmd(["iptables", "-V"])
        if r.rc is None:
            return Result(
                "iptables",
                WARN,
                "no `iptables` command: tether does not need it (python-iptables writes the legacy tables through libiptc)",
                "`apt-get install iptables` to see tether's rules (`iptables-legacy -t nat -S`)",
            )
        backend = iptables_backend(r.out + r.err)
        version = first_line(r.out + r.err).split(" (")[0]
        if backend == "legacy":
            return Result("iptables", OK, f"host `iptables` is legacy ({version}), as are tether's rules (python-iptables)")
        if backend == "nf_tables":
            return Result(
                "iptables",
                WARN,
                f"host `iptables` is the nf_tables backend ({version}) and tether (python-iptables) writes legacy: "
                "`iptables -S` does not show tether's rules, though both apply to every packet",
                "tether's rules are in the legacy tables: see them with iptables-legacy -t nat -S",
            )
        return Result("iptables", WARN, f"cannot tell the backend of `iptables` ({version or 'no output'})", "tether's rules are in the legacy tables: see them with iptables-legacy -t nat -S")

    def forwarding(self) -> Result:
        try:
            fwd = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        except OSError as e:
            return Result("forwarding", FAIL, f"cannot read net.ipv4.ip_forward: {e.strerror}", "mount /proc")
        if fwd != "1":
            return Result(
                "forwarding",
                FAIL,
                "net.ipv4.ip_forward is 0: containers reach nothing beyond the bridge, published ports do not answer",
                "`sysctl -w net.ipv4.ip_forward=1` (tether-fused sets it at start: something reset it)",
            )
        # another tool's FORWARD policy DROP or DOCKER-USER drop (Docker's):
        # the firewall check (the driver's) says whether tether's accepts are there
        return Result("forwarding", OK, "net.ipv4.ip_forward is 1")

    # tether's own state ---------------------------------------------------------------
    def bridge(self) -> Result:
        net = self.cfg.network
        br, want = net.bridge, f"{net.gateway}/{net.network.prefixlen}"
        start = f"restart tether-fused: it creates {br} with {want} at start"
        r = run_cmd(["ip", "-j", "-d", "addr", "show"])
        if r.rc != 0:
            return Result("bridge", FAIL, f"cannot list interfaces: {first_line(r.err) or r.rc}", "install iproute2")
        links = json.loads(r.out or "[]")
        me = next((ln for ln in links if ln.get("ifname") == br), None)
        if me is None:
            return Result("bridge", FAIL, f"no interface {br}", start)
        kind = me.get("linkinfo", {}).get("info_kind")
        if kind != "bridge":
            return Result("bridge", FAIL, f"{br} is a {kind or 'plain'} interface, not a bridge", f"choose another [network] bridge, or delete {br}")
        v4 = [f"{a['local']}/{a['prefixlen']}" for a in me.get("addr_info", []) if a.get("family") == "inet"]
        if "UP" not in me.get("flags", []):
            return Result("bridge", FAIL, f"{br} is down", f"`ip link set {br} up`, or {start}")
        if want not in v4:
            return Result("bridge", FAIL, f"{br} is up but lacks the gateway address {want} (has {', '.join(v4) or 'none'})", start)
        clash = []
        for ln in links:
            if ln.get("ifname") == br:
                continue
            for a in ln.get("addr_info", []):
                if a.get("family") != "inet":
                    continue
                other = ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
                for label, mine in (("subnet", net.network), ("facade_subnet", net.facade_network)):
                    if other.overlaps(mine):
                        clash.append(f"{ln['ifname']} has {a['local']}/{a['prefixlen']} in {label} {mine}")
        if clash:
            return Result("bridge", WARN, f"{br} is up with {want}, but {'; '.join(clash)}", "give tether subnets no other interface uses ([network] subnet, facade_subnet)")
        return Result("bridge", OK, f"{br} is up with {want}")

    def daemon(self) -> Result:
        sock = self.cfg.socket_path
        try:
            st = os.stat(sock)
        except FileNotFoundError:
            return Result("daemon", FAIL, f"no socket at {sock}", START)
        except OSError as e:
            return Result("daemon", FAIL, f"cannot stat {sock}: {e.strerror}", "run as root")
        if not stat.S_ISSOCK(st.st_mode):
            return Result("daemon", FAIL, f"{sock} is not a socket", f"remove it, then {START}")
        try:
            items = request(str(sock), "ps", timeout=CMD_TIMEOUT)
        except Unreachable as e:
            detail = str(e).removesuffix(f": {START}")
            return Result("daemon", FAIL, detail, f"restart it (`systemctl restart tether-fused`); its log says why (`journalctl -u tether-fused`)")
        except DaemonError as e:
            return Result("daemon", FAIL, f"answered `ps` with an error: {e}", "check its log (`journalctl -u tether-fused`)")
        running = sum(1 for c in items if c.get("state") == "running")
        return Result("daemon", OK, f"answers on {sock}: {len(items)} container(s), {running} running")

    def store(self) -> Result:
        if self.cfg.clustered:
            return self.etcd()
        import sqlite3

        from .store.sqlite import SCHEMA_VERSION

        path = self.cfg.db_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Result("store", FAIL, f"no store at {path}", f"tether-fused creates it at start: {START}")
        except OSError as e:
            return Result("store", FAIL, f"cannot stat {path}: {e.strerror}", "run as root")
        try:
            db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=CMD_TIMEOUT)
            try:
                v = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                n = db.execute("SELECT count(*) FROM containers").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error as e:
            return Result("store", FAIL, f"{path} is not a readable tether store: {e}", f"restore it from a backup, or move it away and {START} (all leases are lost)")
        if v is None:
            return Result("store", FAIL, f"{path} has no schema version", "move it away and restart tether-fused (all leases are lost)")
        if int(v[0]) > SCHEMA_VERSION:
            return Result("store", FAIL, f"{path} has schema version {v[0]}, newer than this tether ({SCHEMA_VERSION})", "upgrade tether")
        mode = stat.S_IMODE(st.st_mode)
        detail = f"{path}: schema {v[0]}, {n} container(s)"
        if mode != 0o600 or st.st_uid != 0:
            return Result("store", WARN, f"{detail}, but mode {mode:04o} owner uid {st.st_uid} (want 0600, root)", f"`chown root {path} && chmod 600 {path}`")
        return Result("store", OK, f"{detail}, mode 0600")

    # several hosts ---------------------------------------------------------------
    def _etcd(self, endpoint: str, path: str, body: dict) -> dict:
        """One request to etcd's JSON gateway (stdlib: the doctor loads no
        client library)."""
        import urllib.request

        req = urllib.request.Request(f"{endpoint}/v3{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=CMD_TIMEOUT) as resp:
            return json.loads(resp.read() or b"{}")

    def _range(self, endpoint: str, prefix: str, count_only: bool = False) -> dict:
        import base64

        end = bytearray(prefix.encode())
        end[-1] += 1
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        body = {"key": b64(prefix.encode()), "range_end": b64(bytes(end))}
        if count_only:
            body["count_only"] = True
        return self._etcd(endpoint, "/kv/range", body)

    def hosts(self, endpoint: str) -> dict[str, dict]:
        """The live hosts (their etcd lease records)."""
        import base64

        p = f"{self.cfg.store.prefix}/host/"
        out = {}
        for kv in self._range(endpoint, p).get("kvs", []):
            out[base64.b64decode(kv["key"]).decode()[len(p):]] = json.loads(base64.b64decode(kv.get("value", "")) or "{}")
        return out

    def etcd(self) -> Result:
        st = self.cfg.store
        errors = []
        for ep in st.endpoints:
            try:
                status = self._etcd(ep, "/maintenance/status", {})
                containers = int(self._range(ep, f"{st.prefix}/c/", count_only=True).get("count", 0))
                hosts = self.hosts(ep)
            except (OSError, ValueError) as e:
                errors.append(f"{ep}: {getattr(e, 'reason', None) or e}")
                continue
            self._endpoint = ep
            me = self._host()
            detail = (f"etcd {status.get('version', '?')} at {ep}, prefix {st.prefix}: {containers} container(s), "
                      f"live hosts {', '.join(sorted(hosts)) or 'none'}")
            if me not in hosts:
                return Result("store", WARN, f"{detail}; this host ({me}) is not among them",
                              f"{START}: it joins at start and renews its lease every [cluster] lease_ttl / 3 s")
            return Result("store", OK, detail)
        return Result("store", FAIL, f"etcd is unreachable: {'; '.join(errors)}",
                      "start etcd, or fix [store] endpoints; running containers keep working meanwhile")

    def _host(self) -> str:
        try:
            return self.cfg.cluster.host_name
        except ValueError:
            return "?"

    def overlay(self) -> Result:
        if not self.cfg.clustered:
            return Result("overlay", OK, "one host ([store] backend = \"sqlite\"): no overlay")
        cl, br = self.cfg.cluster, self.cfg.network.bridge
        vx = overlay_name(br)
        restart = f"restart tether-fused: it makes {vx} at start"
        r = run_cmd(["ip", "-j", "-d", "link", "show", "dev", vx])
        if r.rc != 0:
            return Result("overlay", FAIL, f"no overlay device {vx}", restart)
        ln = (json.loads(r.out or "[]") or [{}])[0]
        data = ln.get("linkinfo", {}).get("info_data", {})
        if ln.get("master") != br or "UP" not in ln.get("flags", []):
            return Result("overlay", FAIL, f"{vx} is not up on {br}", restart)
        if data.get("id") != cl.vxlan_id or data.get("local") != cl.underlay:
            return Result("overlay", FAIL, f"{vx} is vxlan {data.get('id')} on {data.get('local')}, the config says "
                          f"{cl.vxlan_id} on {cl.underlay}", restart)
        ep = getattr(self, "_endpoint", None) or self.cfg.store.endpoints[0]
        try:
            hosts = self.hosts(ep)
        except (OSError, ValueError) as e:
            return Result("overlay", WARN, f"{vx}: vxlan {cl.vxlan_id} on {cl.underlay}, mtu {ln.get('mtu')}; the hosts "
                          f"are not known (etcd: {getattr(e, 'reason', None) or e})", "see the store check")
        f = run_cmd(["bridge", "-j", "fdb", "show", "dev", vx])
        flood = {e.get("dst") for e in json.loads(f.out or "[]") if e.get("mac") == "00:00:00:00:00:00"}
        others = {h: r.get("underlay") for h, r in hosts.items() if h != self._host()}
        missing = [f"{h} ({u})" for h, u in sorted(others.items()) if u not in flood]
        detail = f"{vx}: vxlan {cl.vxlan_id} on {cl.underlay}, mtu {ln.get('mtu')}, {len(others)} other host(s)"
        if missing:
            return Result("overlay", FAIL, f"{detail}, but no entry for {', '.join(missing)}",
                          "check that host's tether-fused, then this one's log; a restart writes the entries again")
        return Result("overlay", OK, detail + (f": {', '.join(sorted(others))}" if others else ""))

    def mount(self) -> Result:
        fs = os.path.join(os.path.realpath(self.cfg.run_dir), "fs")  # realpath of run_dir only: never stat inside the mount
        try:
            info = Path("/proc/self/mountinfo").read_text()
        except OSError as e:
            return Result("mount", FAIL, f"cannot read /proc/self/mountinfo: {e.strerror}", "mount /proc")
        found = mounts_at(info, fs)
        if not found:
            return Result(
                "mount", FAIL, f"nothing is mounted at {fs}",
                "restart tether-fused (`systemctl restart tether-fused`): it mounts the served files there, attaching "
                "the connection running containers still use; until then new containers cannot start",
            )
        fstype, _src = found[-1]
        if fstype != "fuse.tether":
            return Result("mount", FAIL, f"{fs} is a {fstype} mount, not tether's fuse.tether", f"`umount {fs}`, then restart tether-fused")
        probe = os.path.join(fs, PROBE_NAME, "hosts")
        # a child process: reading a stuck FUSE mount can block, and only a process can be killed
        code = (
            "import sys\n"
            "try:\n"
            "    d = open(sys.argv[1], 'rb').read(1 << 20)\n"
            "except OSError as e:\n"
            "    print(e.errno, e.strerror); sys.exit(3)\n"
            "sys.stdout.write(d.decode('ascii', 'replace'))\n"
        )
        r = run_cmd([sys.executable, "-I", "-S", "-c", code, probe])
        if r.rc is None:
            return Result("mount", FAIL, f"reading {probe} did not finish within {CMD_TIMEOUT:g} s: the daemon's FUSE server is stuck",
                          "restart tether-fused (`systemctl restart tether-fused`); its log says why")
        if r.rc == 3:
            errno_s, _, why = r.out.strip().partition(" ")
            if errno_s == str(errno.ENOTCONN):
                return Result(
                    "mount",
                    FAIL,
                    f"stale mount at {fs}: the FUSE connection behind it is dead ({why}): every process that held it "
                    "is gone, or it was aborted",
                    f"start tether-fused again (it detaches the stale mount first), or `umount -l {fs}`; "
                    "containers started before keep the dead files until they restart",
                )
            return Result("mount", FAIL, f"reading {probe} fails: {why}", "restart tether-fused; its log says why")
        if r.rc != 0:
            return Result("mount", FAIL, f"cannot run the probe: {first_line(r.err) or r.rc}", "a tether bug: report this line")
        if "localhost" not in r.out:
            return Result("mount", WARN, f"fuse.tether at {fs}, but {probe} has no localhost line (not published yet?)", "run doctor again; if it stays, restart tether-fused")
        return Result("mount", OK, f"fuse.tether at {fs} serves files ({PROBE_NAME}/hosts: {len(r.out)} bytes)")

    def file_server(self) -> Result:
        """The process that answers FUSE requests (<run_dir>/fsd.pid)."""
        path = self.cfg.run_dir / "fsd.pid"
        pid = read_pid(path)
        if pid is None:
            return Result("file-server", FAIL, f"no file server ({path} is missing)", f"tether-fused starts it: {START}")
        if not os.path.exists(f"/proc/{pid}"):
            return Result("file-server", FAIL, f"file server {pid} (from {path}) is not running",
                          "restart tether-fused (`systemctl restart tether-fused`): it starts another on the same connection")
        if file_server_pid(self.cfg.run_dir) != pid:
            return Result("file-server", FAIL, f"pid {pid} in {path} is not tether's file server", f"remove {path}, then restart tether-fused")
        keeper = keeper_pid(self.cfg.run_dir)
        kept = f"; {KEEPER_NAME} {keeper} holds the connection too" if keeper else ""
        return Result("file-server", OK, f"pid {pid} serves {self.cfg.run_dir / 'fs'} (it outlives restarts of tether-fused){kept}")

    def containers(self) -> Result:
        """Each running container's served files, read from inside its own
        mount namespace and compared with what tether serves (container_files)."""
        running, source = self._running()
        if running is None:
            return Result("containers", WARN, f"not checked: {source}", "see the daemon and store lines")
        findings = cf.check(cf.host_mount(self.cfg.run_dir), running, self._served)
        return containers_result(findings, source)

    def _running(self) -> tuple[list[cf.Container] | None, str]:
        """This host's running containers, from the daemon, else (SQLite) from
        the store: the files outlive tether-fused, and so does this check."""
        try:
            items = request(str(self.cfg.socket_path), "ps", timeout=CMD_TIMEOUT)
            source = "the daemon's list"
        except (Unreachable, DaemonError) as e:
            why = first_line(str(e))
            if self.cfg.clustered:
                return None, f"the daemon did not answer ({why})"
            import sqlite3

            try:
                db = sqlite3.connect(f"file:{urllib.parse.quote(str(self.cfg.db_path))}?mode=ro", uri=True,
                                     timeout=CMD_TIMEOUT)
                try:
                    rows = db.execute("SELECT name, id, pid FROM containers WHERE state = 'running'").fetchall()
                finally:
                    db.close()
            except sqlite3.Error as e:
                return None, f"the daemon did not answer ({why}) and the store cannot be read ({e})"
            items = [{"name": name, "id": cid, "pid": pid, "state": "running"} for name, cid, pid in rows]
            source = "the store (the daemon did not answer)"
        me = self._host() if self.cfg.clustered else None
        return [cf.Container(c["name"], c["id"], c["pid"]) for c in items
                if c.get("state") == "running" and c.get("pid") and (me is None or c.get("host") == me)], source

    def _served(self, name: str) -> dict[str, bytes] | None:
        """What the daemon serves for `name` (when the host's mount cannot be read)."""
        try:
            files = request(str(self.cfg.socket_path), "inspect", {"name": name}, timeout=CMD_TIMEOUT)["files"]
        except (Unreachable, DaemonError, KeyError, TypeError):
            return None
        return {f: text.encode() for f, text in files.items()}

    def firewall(self) -> Result:
        """The driver's own diagnosis of what the kernel holds of tether."""
        from .net import firewall as fw_mod

        if self.driver == "none":
            return Result("firewall", OK, "driver none: tether writes no rules; forwarding and NAT are yours")
        try:
            f = fw_mod.make(self.driver, self.cfg.firewall.chain_prefix, bridge=self.cfg.network.bridge)
        except fw_mod.FirewallError as e:
            return Result("firewall", FAIL, str(e), "see kernel-nat")
        ok, msg, fix = f.check()
        return Result("firewall", OK if ok else FAIL, f"{self.driver}: {msg}", fix)

    def isolation(self) -> Result:
        """isolation = "links": the bridge hands its switched traffic to the
        firewall (br_netfilter, the bridge's own option) and the ISOLATE chain is there."""
        net = self.cfg.network
        if net.isolation == "none":
            return Result("isolation", OK, "none: containers on the bridge reach each other (Docker's icc=true)")
        knob = Path(f"/sys/class/net/{net.bridge}/bridge/nf_call_iptables")
        try:
            on = knob.read_text().strip() == "1"
        except OSError:
            return Result("isolation", FAIL, f"links, but bridge {net.bridge} is missing", "start tether-fused")
        if not Path("/proc/sys/net/bridge").exists():
            return Result("isolation", FAIL, "links, but br_netfilter is not loaded: the bridge's switched traffic "
                          "never reaches the firewall", "modprobe br_netfilter, then restart tether-fused")
        if not on:
            return Result("isolation", FAIL, f"links, but {net.bridge} does not pass its traffic to the firewall "
                          f"({knob} is 0): containers reach each other", "restart tether-fused: it sets it at start")
        if self.driver == "none":
            return Result("isolation", WARN, "links, but [firewall] driver = none writes no rules: nothing is isolated",
                          'set driver = "auto" in [firewall]')
        from .net import firewall as fw_mod

        try:
            chains = fw_mod.make(self.driver, self.cfg.firewall.chain_prefix).dump()
        except fw_mod.FirewallError as e:
            return Result("isolation", FAIL, str(e), "see kernel-nat")
        if not any(chain.endswith("ISOLATE") for _, chain in chains):
            return Result("isolation", FAIL, "links, but tether's ISOLATE chain is missing: containers reach each other",
                          "restart tether-fused")
        return Result("isolation", OK, f"links: {net.bridge}'s switched traffic passes the firewall (br_netfilter, "
                      "this bridge only), and its ISOLATE chain lets containers talk only along links")

    def dns(self) -> Result:
        d, gw = self.cfg.dns, str(self.cfg.network.gateway)
        if not d.enabled:
            return Result("dns", OK, "disabled in the config ([dns] enabled = false)")
        r = run_cmd(["ss", "-Hlnptu"])
        if r.rc != 0:
            return Result("dns", WARN, f"cannot list sockets: {first_line(r.err) or r.rc}", "install iproute2 (ss)")
        protos = sorted({proto for proto, addr, _ in listeners(r.out, 53) if addr in (gw, "0.0.0.0", "*")})
        if "udp" not in protos:
            return Result("dns", FAIL, f"nothing listens on {gw}:53/udp: containers' resolv.conf points there", f"{START}; its log says why the responder did not start")
        # tether-fused keeps a copy of the sockets: a listener alone does not
        # mean that anything answers on them
        from .child import running

        pid = running(self.cfg.run_dir, "dns", "fused.dns.server")
        if pid is None:
            return Result("dns", FAIL, f"{gw}:53 is bound, but no DNS process of this run_dir answers on it "
                          f"(<run_dir>/dns.pid): containers' lookups go unanswered",
                          "restart tether-fused, which starts it; its log says why it stopped")
        return Result("dns", OK, f"listening on {gw}:53 {'+'.join(protos)}, answered by DNS process {pid}")


    def conntrack(self) -> Result:
        from .net.wiring import Wiring

        if Wiring.cut_problem() is not None:
            return Result("conntrack", FAIL, "conntrack(8) is not installed: retargets and moves are refused "
                          "(they cut the old target's connections)", "apt-get install conntrack")
        return Result("conntrack", OK, f"{shutil.which('conntrack')}: a retarget cuts the old target's connections")

    # runtimes ------------------------------------------------------------------
    def podman_hooks(self) -> Result:
        """Will podman run tether's createRuntime hook? Read the directories
        podman reads (its containers.conf), as podman does."""
        from . import podman

        name = "podman-hooks"
        if shutil.which("podman") is None:
            return Result(name, OK, "podman is not installed (runc only)")
        dirs = podman.hooks_dirs()
        fix = "run `tether oci hooks-dir" + (f" --config {self.cfg.source}" if self.cfg.source else "") + "`"
        found = [f for d in dirs for f in podman.find_hooks(d) if f.stage == "createRuntime"]
        this = os.path.realpath(str(self.cfg.source or config_mod.DEFAULT_PATH))
        mine = [f for f in found if os.path.realpath(f.config or config_mod.DEFAULT_PATH) == this]
        where = ", ".join(dirs) or "no directory (hooks_dir = [])"
        if not mine:
            elsewhere = [f for d in podman.OTHER_HOOKS_DIRS + podman.DEFAULT_HOOKS_DIRS if d not in dirs
                         for f in podman.find_hooks(d)
                         if f.stage == "createRuntime" and os.path.realpath(f.config or config_mod.DEFAULT_PATH) == this]
            if elsewhere:
                return Result(name, FAIL, f"tether's hook is in {elsewhere[0].path}, but podman reads hooks only from {where}",
                              f"{fix} (it writes into {dirs[0] if dirs else 'DIR'}), then remove {elsewhere[0].path}")
            if found:
                return Result(name, WARN, f"podman runs tether-hook with --config {found[0].config} ({found[0].path}), "
                              "not this config", f"{fix} if podman containers should use this daemon")
            return Result(name, WARN, f"podman will not run tether's hook: no tether hooks.d file in {where}",
                          f"{fix} if you run containers with podman")
        f = mine[0]
        if not os.access(f.hook, os.X_OK):
            return Result(name, FAIL, f"{f.path} runs {f.hook}, which is not an executable", f"reinstall tether, then {fix}")
        return Result(name, OK, f"podman reads tether's hook from {f.path}")

    def drift(self) -> Result:
        """Containers the runtimes run that tether has stopped or never saw,
        and the reverse (see fused/drift.py); asks the daemon."""
        try:
            items = request(str(self.cfg.socket_path), "drift", timeout=CHECK_TIMEOUT - 1)
        except (Unreachable, DaemonError) as e:
            return Result("drift", WARN, f"not checked: the daemon did not answer ({first_line(str(e))})", "see the daemon line")
        if not items:
            return Result("drift", OK, "the runtimes and tether agree on every container")
        first = items[0]
        more = f" (and {len(items) - 1} more: `tether ps` lists them)" if len(items) > 1 else ""
        return Result("drift", WARN, f"{first['name']}: {first['problem']}{more}", first["why"])


def main(config: str | None, as_json: bool) -> int:
    try:
        cfg = config_mod.load(config)
    except config_mod.ConfigError as e:
        results = [Result("config", FAIL, str(e), "correct it, or pass another with --config; the other checks need a usable config")]
    else:
        where = str(cfg.source) if cfg.source else f"built-in defaults (no {config_mod.DEFAULT_PATH})"
        results = [Result("config", OK, where)] + Doctor(cfg).run()
    print(render(results, as_json))
    sys.stdout.flush()
    return exit_code(results)
