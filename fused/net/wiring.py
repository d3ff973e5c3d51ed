"""Bridge and veth wiring with pyroute2.

Every method here is synchronous and runs on one dedicated OS thread (see
`Worker`): a pyroute2 socket is not thread safe, and a network namespace
belongs to the thread that entered it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import trio


def _import_pyroute2():
    """pyroute2's package __init__ imports every part of the library (NDB,
    IPDB, nl80211, IPVS, WireGuard, plan9, ...): 6 MiB of the daemon's RSS
    and 50 ms of its start. The wiring needs IPRoute and NetlinkError alone,
    so the package is registered without running its __init__ and only those
    modules load (unless something imported pyroute2 whole already)."""
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    return IPRoute, NetlinkError


IPRoute, NetlinkError = _import_pyroute2()

from ..errors import WiringError  # wiring.WiringError: the same class
from ..model import mac_for, overlay_name

log = logging.getLogger("tether.net")

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


class Worker:
    """Runs blocking calls on one dedicated thread, awaited from trio."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn, *args):
        fut = self._pool.submit(fn, *args)
        return await trio.to_thread.run_sync(fut.result)

    def submit(self, fn, *args) -> None:
        """Queue a call without waiting for it; later calls run after it."""

        def logged():
            try:
                fn(*args)
            except Exception:
                log.exception("background %s failed", getattr(fn, "__name__", fn))

        self._pool.submit(logged)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def veth_name(bridge: str, name: str) -> str:
    """Host-side veth name: stable per (bridge, container name), 12 chars."""
    return "tt" + hashlib.sha1(f"{bridge}/{name}".encode()).hexdigest()[:10]


def netns_inode(pid: int) -> int | None:
    """The inode of a process's network namespace, or None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Endpoint:
    pid: int
    veth: str
    ip: str
    prefixlen: int
    mac: str
    gateway: str
    answers: tuple[tuple[str, str], ...] = ()  # others' (address, MAC) it answers at too (a move)


def _set_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _no_ipv6(ifname: str) -> None:
    """IPv6 off on an interface of the current netns (nothing to do on a host without IPv6)."""
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if os.path.exists(path):
        _set_sysctl(path, "1")


class Wiring:
    def __init__(self, bridge: str, gateway: str, prefixlen: int, isolated: bool = False,
                 strategy: str = "facade", cluster: bool = False) -> None:
        self.bridge = bridge
        self.strategy = strategy  # veth-move and reassign hand addresses over (hand_over)
        self.gateway = gateway
        self.prefixlen = prefixlen
        # isolation = "links": traffic between two containers on the bridge
        # (bridged, not routed) passes the firewall's forward hooks too
        # (br_netfilter), where the isolation chain decides
        self.isolated = isolated
        # several hosts: a facade's DNAT keeps the consumer's address, and the
        # target's replies come back bridged through the overlay: they must
        # pass this host's conntrack to be un-DNAT'ed (br_netfilter too)
        self.cluster = cluster
        self.mtu: int | None = None  # the overlay's (several hosts): containers' too, or big frames vanish in it
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _index(self, ifname: str) -> int | None:
        """An interface of the host's netns (where this thread is between
        calls), by name: if_nametoindex(3) is one ioctl, a pyroute2 request
        half a millisecond of Python."""
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            return None

    # --- bridge -----------------------------------------------------------
    def ensure_bridge(self) -> None:
        idx = self._index(self.bridge)
        if idx is None:
            self.ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = self._index(self.bridge)
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in self.ipr.get_addr(index=idx, family=2)
        }
        if (self.gateway, self.prefixlen) not in have:
            self.ipr.addr("add", index=idx, address=self.gateway, prefixlen=self.prefixlen)
        # a bridge with no address of its own takes the lowest of its ports'
        # MACs, and changes it when a port with a lower one joins: the
        # gateway's MAC would move under every container's ARP cache (seconds
        # of lost traffic at another's start). The one several hosts share:
        mac = mac_for(self.gateway)
        if self.ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS") != mac:
            self.ipr.link("set", index=idx, address=mac)
        self.ipr.link("set", index=idx, state="up")
        _set_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        # the host's own 127.0.0.1:HOSTPORT, DNAT'ed to a container, leaves
        # through the bridge with a loopback source (masqueraded on the way)
        _set_sysctl(f"/proc/sys/net/ipv4/conf/{self.bridge}/route_localnet", "1")
        if self.isolated or self.cluster:
            self._filter_bridged(idx)
        else:  # isolation switched off: its traffic no longer goes to other tools' forward chains
            self.ipr.link("set", index=idx, kind="bridge", br_nf_call_iptables=0, br_nf_call_ip6tables=0)

    def _filter_bridged(self, idx: int) -> None:
        """Make this bridge's bridged IPv4/IPv6 traffic pass the inet forward
        hooks (the bridge's own nf_call_iptables option: no host-wide sysctl).
        br_netfilter must be loaded for that; when tether loads it, the
        module's host-wide defaults (every bridge filtered) are set back to
        off, so no other bridge on the host changes behaviour."""
        knob = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        if not os.path.exists(knob):
            try:
                p = subprocess.run(["modprobe", "br_netfilter"], capture_output=True, text=True)
                why = (p.stderr or p.stdout).strip() or "modprobe br_netfilter failed"
            except OSError as e:
                why = f"modprobe: {e.strerror}"
            if not os.path.exists(knob):
                who = 'several hosts ([store] backend = "etcd")' if self.cluster else 'isolation = "links"'
                fix = "" if self.cluster else ', or set isolation = "none" in [network]'
                raise WiringError(
                    f"{who} needs the br_netfilter kernel module, which could not be loaded ({why}): "
                    f"load it (`modprobe br_netfilter`){fix}"
                )
            for family in ("iptables", "ip6tables", "arptables"):
                _set_sysctl(f"/proc/sys/net/bridge/bridge-nf-call-{family}", "0")
            log.info("isolation: loaded br_netfilter, host-wide bridge filtering left off (only %s is filtered)", self.bridge)
        try:
            self.ipr.link("set", index=idx, kind="bridge", br_nf_call_iptables=1, br_nf_call_ip6tables=1)
        except NetlinkError as e:
            raise WiringError(
                f"isolation = \"links\": cannot make bridge {self.bridge} pass its traffic to the firewall "
                f"({os.strerror(e.code)}): set isolation = \"none\" in [network]"
            ) from e

    def has_bridge(self) -> bool:
        return self._index(self.bridge) is not None

    def delete_bridge(self) -> None:
        idx = self._index(self.bridge)
        if idx is not None:
            for veth in self.bridge_ports():
                self.unwire(veth)
            self.delete_overlay()
            self.ipr.link("del", index=idx)

    def bridge_ports(self) -> list[str]:
        idx = self._index(self.bridge)
        if idx is None:
            return []
        vx = self.overlay_name()
        return [name for ln in self.ipr.get_links()
                if ln.get_attr("IFLA_MASTER") == idx and (name := ln.get_attr("IFLA_IFNAME")) != vx]

    # --- containers -------------------------------------------------------
    def veth_exists(self, veth: str) -> bool:
        return self._index(veth) is not None

    def wire(self, ep: Endpoint) -> None:
        """veth pair: host end on the bridge, eth0 in the container's netns."""
        bridge_idx = self._index(self.bridge)
        if bridge_idx is None:
            raise WiringError(f"bridge {self.bridge} is missing: restart tether-fused")
        if self._index(ep.veth) is not None:
            self.unwire(ep.veth)
        # the peer is born in the container's netns as eth0, with its MAC
        peer = "eth0"
        mtu = {"mtu": self.mtu} if self.mtu else {}
        try:
            self.ipr.link("add", ifname=ep.veth, kind="veth", **mtu,
                          peer={"ifname": peer, "address": ep.mac, "net_ns_pid": ep.pid, **mtu})
        except NetlinkError as e:
            if e.code == errno.EEXIST and self._index(ep.veth) is None:
                raise WiringError(
                    f"the container's network namespace already has a network (eth0): tether needs one "
                    "with only lo; podman: --network none"
                ) from e
            raise WiringError(f"cannot create veth for pid {ep.pid}: {os.strerror(e.code)}") from e
        try:
            self._configure_inside(ep, peer)
            idx = self._index(ep.veth)
            self.ipr.link("set", index=idx, master=bridge_idx, state="up")
        except BaseException:
            self.unwire(ep.veth)
            raise
        for ip, mac in ep.answers:  # a restart of a container a move gave addresses to
            try:
                self.answer(ip, mac, ep.pid, home=None)
            except (WiringError, NetlinkError, OSError) as e:  # its own address works: a warning
                log.warning("%s: could not answer at %s again: %s", ep.veth, ip, e)

    # --- strategies veth-move and reassign (tether move) ------------------------
    def answer_veth(self, ip: str) -> str:
        """The host-side veth of an address answered for another container."""
        return veth_name(self.bridge, "@" + ip)

    def hand_over(self, ip: str, mac: str, giver_pid: int | None, taker_pid: int, home: str | None,
                  giver_own: bool = False, create: bool = True) -> str:
        """Make the netns of `taker_pid` answer at `ip` instead of that of
        `giver_pid` (None: gone). veth-move: the giver's interface with that
        MAC moves over (same address, same MAC: no ARP change); without one,
        a new veth with that address and MAC. reassign: the address moves to
        the taker's eth0, announced by gratuitous ARP. `home`: it is the
        taker's own address (an undo), and this the name of its host-side
        veth: it becomes its eth0 again, with the default route. `giver_own`:
        it is the giver's own address (on its eth0 with the subnet's prefix,
        not a /32). `create`: veth-move makes a new interface when the giver
        has none (a hand-back does not). Returns what was done, for the log."""
        if self.strategy == "reassign":
            t0 = time.perf_counter()
            if giver_pid is not None:
                self._drop_address(giver_pid, ip, self.prefixlen if giver_own else 32)
            t1 = time.perf_counter()
            self._add_address(taker_pid, ip, home)
            t2 = time.perf_counter()
            self._garp_quietly(taker_pid, "eth0", ip)
            t3 = time.perf_counter()
            return (f"address moved, gratuitous ARP sent: off the giver {(t1 - t0) * 1000:.1f}, "
                    f"onto the taker {(t2 - t1) * 1000:.1f}, ARP {(t3 - t2) * 1000:.1f} ms")
        t0 = time.perf_counter()
        if giver_pid is not None and (steps := self._move_interface(giver_pid, taker_pid, ip, mac, home)):
            return f"interface moved in {(time.perf_counter() - t0) * 1000:.1f} ms ({steps})"
        if not create:
            return "nothing to move"
        self.answer(ip, mac, taker_pid, home)
        return "interface created (the giver's was gone)"

    def unanswer(self, ip: str, pid: int) -> None:
        """Stop the netns of `pid` answering at another's `ip` (a hand-back
        with nobody to take it)."""
        if self.strategy == "reassign":
            self._drop_address(pid, ip, 32)
        else:
            self.unwire(self.answer_veth(ip))

    def _garp_quietly(self, pid: int, ifname: str, ip: str) -> None:
        """A gratuitous ARP now, and again after 0.1 and 0.5 s off this thread
        (as `arping -U -c 3`): a bridge port that just came up forwards only
        once the kernel has seen its carrier, and a neighbour that missed the
        first would go on sending to the old MAC until its entry goes stale.
        A hint all the same: a failure is logged."""
        def send(delay: float) -> None:
            time.sleep(delay)
            try:
                self.garp(pid, ifname, ip)
            except (OSError, WiringError) as e:
                if delay == 0:
                    log.warning("gratuitous ARP for %s from %s could not be sent: %s", ip, ifname, e)

        send(0)
        threading.Thread(target=lambda: (send(0.1), send(0.4)), daemon=True).start()

    def answer(self, ip: str, mac: str, pid: int, home: str | None) -> None:
        """Make the netns of `pid` answer at `ip` (its MAC `mac`) by the
        strategy's means, on a fresh interface (veth-move) or on eth0."""
        if self.strategy == "reassign":
            self._add_address(pid, ip, home)
            self._garp_quietly(pid, "eth0", ip)
            return
        host = home or self.answer_veth(ip)
        if self._index(host) is not None:
            self.unwire(host)
        inner = self._inside(pid)
        try:
            name = "eth0" if home else _free_name(inner)
        finally:
            inner.close()
        self.ipr.link("add", ifname=host, kind="veth", peer={"ifname": name, "address": mac, "net_ns_pid": pid})
        try:
            self._up_inside(pid, name, ip, home)
            self.ipr.link("set", index=self._index(host), master=self._index(self.bridge), state="up")
        except BaseException:
            self.unwire(host)
            raise
        self._garp_quietly(pid, name, ip)  # the bridge learns the MAC's new port

    def _move_interface(self, giver_pid: int, taker_pid: int, ip: str, mac: str, home: str | None) -> str | None:
        """The giver's interface with `mac` into the taker's netns; its steps'
        times for the log, None when the giver has no such interface."""
        t = [time.perf_counter()]
        taker = self._inside(taker_pid)
        try:
            name = "eth0" if home else _free_name(taker)
        finally:
            taker.close()
        inner = self._inside(giver_pid)
        try:
            idx = next((ln["index"] for ln in inner.get_links() if ln.get_attr("IFLA_ADDRESS") == mac), None)
            if idx is None:
                return None
            peer = inner.get_links(idx)[0].get_attr("IFLA_LINK")  # the host side's index
            t.append(time.perf_counter())
            # one request: into the taker's netns, renamed on the way (the
            # taker has an eth0 of its own); the kernel takes it down
            inner.link("set", index=idx, net_ns_pid=taker_pid, ifname=name)
            t.append(time.perf_counter())
        finally:
            inner.close()
        self._up_inside(taker_pid, name, ip, home)
        self._garp_quietly(taker_pid, name, ip)  # neighbours that learnt another MAC for it meanwhile
        t.append(time.perf_counter())
        # the host side is named for who answers at it now (after: it carries
        # traffic); under its old name, OLD's stop or start would delete it
        if not peer:
            raise WiringError(f"veth-move: the host side of {ip}'s interface is unknown")
        self._rename(peer, home or self.answer_veth(ip))
        t.append(time.perf_counter())
        return ", ".join(f"{what} {(b - a) * 1000:.1f}" for what, a, b in zip(("find", "netns", "up", "host name"), t, t[1:]))

    def _rename(self, index: int, name: str) -> None:
        """Rename a host interface, live where the kernel allows it (6.2+),
        else down, rename, up."""
        try:
            self.ipr.link("set", index=index, ifname=name)
            return
        except NetlinkError as e:
            if e.code != errno.EBUSY:
                raise WiringError(f"veth-move: cannot rename host interface {index} to {name}: {os.strerror(e.code)}") from e
        try:
            self.ipr.link("set", index=index, state="down")
            self.ipr.link("set", index=index, ifname=name)
            self.ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise WiringError(f"veth-move: cannot rename host interface {index} to {name}: {os.strerror(e.code)}") from e

    def _up_inside(self, pid: int, name: str, ip: str, home: str | None) -> None:
        inner = self._inside(pid)
        try:
            idx = _index_of(inner, name)
            # another's address: /32, so no second route to the subnet
            inner.addr("add", index=idx, address=ip, prefixlen=self.prefixlen if home else 32)
            inner.link("set", index=idx, state="up")
            if home:
                inner.route("replace", dst="0.0.0.0/0", gateway=self.gateway)
        finally:
            inner.close()
        if not home:  # packets to it arrive here, replies leave by eth0
            def quiet() -> None:
                _set_sysctl(f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "0")
                # eth0 must not answer ARP for the address on ethN (nor ethN
                # for eth0's): a neighbour would learn eth0's MAC for it, and
                # lose it when the address goes home
                for dev in ("eth0", name):
                    if os.path.exists(f"/proc/sys/net/ipv4/conf/{dev}/arp_ignore"):
                        _set_sysctl(f"/proc/sys/net/ipv4/conf/{dev}/arp_ignore", "1")

            self._inside(pid, quiet)
        if self.isolated:  # a moved device comes with IPv6 again
            self._inside(pid, lambda: _no_ipv6(name))

    def _drop_address(self, pid: int, ip: str, prefixlen: int) -> None:
        inner = self._inside(pid)
        try:
            idx = _index_of(inner, "eth0")
            if idx is not None:
                try:
                    inner.addr("del", index=idx, address=ip, prefixlen=prefixlen)
                    return
                except NetlinkError as e:
                    if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                        raise
            for a in inner.get_addr(family=2):  # elsewhere, or another prefix
                if a.get_attr("IFA_ADDRESS") == ip:
                    inner.addr("del", index=a["index"], address=ip, prefixlen=a["prefixlen"])
        finally:
            inner.close()

    def _add_address(self, pid: int, ip: str, home: str | None) -> None:
        inner = self._inside(pid)
        try:
            idx = _index_of(inner, "eth0")
            if idx is None:
                raise WiringError(f"reassign: the netns of pid {pid} has no eth0 to take {ip}")
            try:
                inner.addr("add", index=idx, address=ip, prefixlen=self.prefixlen if home else 32)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            if home:
                inner.route("replace", dst="0.0.0.0/0", gateway=self.gateway)
        finally:
            inner.close()

    def garp(self, pid: int, ifname: str, ip: str) -> None:
        """A gratuitous ARP (a request for its own address) from `ifname` in
        the netns of `pid`: neighbours that know `ip` learn its new MAC."""
        def send() -> None:
            # protocol 0: a socket that only sends registers no receive hook
            # (binding one that did waits for an RCU grace period)
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                s.bind((ifname, 0))
                mac = s.getsockname()[4][:6]
                addr = socket.inet_aton(ip)
                arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\0" * 6 + addr
                s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
            finally:
                # closing a packet socket waits for an RCU grace period
                # (30 ms measured here): not on the path of the move
                threading.Thread(target=s.close, daemon=True).start()

        self._inside(pid, send)

    def _inside(self, pid: int, fn=IPRoute):
        """fn() run in the netns of `pid` (default: a netlink socket opened
        there); this thread goes back to its own."""
        ns = _open_netns(pid)
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError:
            os.close(ns)
            raise
        try:
            if _libc.setns(ns, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise WiringError(f"cannot enter the netns of pid {pid}: {os.strerror(err)}")
            try:
                return fn()
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                    os.abort()
        finally:
            os.close(ns)
            os.close(own)

    def eth0_of(self, pid: int) -> tuple[str, str, tuple[str, ...]] | None:
        """(address, MAC, others' addresses) in the netns of `pid`, as tether
        configured them: eth0's address with the subnet's prefix, and the /32s
        a move gave it (veth-move, reassign); None without one."""
        inner = self._inside(pid)
        try:
            idx = _index_of(inner, "eth0")
            if idx is None:
                return None
            mac = inner.get_links(idx)[0].get_attr("IFLA_ADDRESS")
            addrs = inner.get_addr(family=2)
            own = [a.get_attr("IFA_ADDRESS") for a in addrs if a["index"] == idx and a["prefixlen"] == self.prefixlen]
            answers = tuple(a.get_attr("IFA_ADDRESS") for a in addrs if a["prefixlen"] == 32 and a["index"] != 1
                            and not a.get_attr("IFA_ADDRESS").startswith("127."))
            return (own[0], mac, answers) if own and mac else None
        finally:
            inner.close()

    def _configure_inside(self, ep: Endpoint, peer: str) -> None:
        inner = self._inside(ep.pid)
        try:
            idx = _index_of(inner, peer)
            if idx is None:
                raise WiringError(f"veth peer vanished in the netns of pid {ep.pid}")
            others = sorted(
                name
                for ln in inner.get_links()
                if (name := ln.get_attr("IFLA_IFNAME")) not in ("lo", peer)
            )
            routes = [r for r in inner.get_routes(family=2, table=254) if not r.get_attr("RTA_DST")]
            if others or routes:
                what = ", ".join(others) or "a default route"
                raise WiringError(
                    f"the container's network namespace already has a network ({what}): tether needs one "
                    "with only lo; podman: --network none"
                )
            if self.isolated:
                # tether gives IPv4 only; IPv6 link-local between containers
                # would pass where the iptables driver filters IPv4 alone
                self._inside(ep.pid, lambda: _no_ipv6(peer))
            inner.addr("add", index=idx, address=ep.ip, prefixlen=ep.prefixlen)
            inner.link("set", index=idx, state="up")
            lo = _index_of(inner, "lo")
            if lo is not None:
                inner.link("set", index=lo, state="up")
            inner.route("add", dst="0.0.0.0/0", gateway=ep.gateway)
        except NetlinkError as e:
            raise WiringError(f"cannot configure eth0 in the netns of pid {ep.pid}: {os.strerror(e.code)}") from e
        finally:
            inner.close()

    @staticmethod
    def cut_problem() -> str | None:
        """Why `cut` cannot work here (None: it can), checked before a change
        that will need it is committed."""
        if shutil.which("conntrack") is None:
            return (
                "conntrack(8) is not installed, so the connections of the old target could not be cut: "
                "install it (`apt-get install conntrack`), then do this again"
            )
        return None

    def cut(self, filters: list[list[str]]) -> int:
        """Delete conntrack entries matching each filter (conntrack(8) options,
        e.g. ["-d", "10.214.0.7"]): the next packet of such a connection is
        tracked anew, reaches the new target, and is reset there. conntrack(8)
        filters in C; decoding the whole table in Python cost 50 ms at 1000
        links."""
        n = 0
        for f in filters:
            p = subprocess.run(["conntrack", "-D", *f], capture_output=True, text=True)
            # exit 1 with "0 flow entries have been deleted" when nothing matched
            for line in p.stderr.splitlines():
                words = line.split()
                if "flow" in words[1:]:
                    n += int(words[words.index("flow") - 1])
        return n

    def unwire_all(self, veths: list[str]) -> None:
        for veth in veths:
            self.unwire(veth)

    def unwire(self, veth: str) -> None:
        idx = self._index(veth)
        if idx is None:
            return
        try:
            self.ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


    # --- the overlay (several hosts) -----------------------------------------
    def overlay_name(self) -> str:
        return overlay_name(self.bridge)

    def ensure_overlay(self, vxlan_id: int, local: str, gateway_mac: str) -> None:
        """The VXLAN device joining this host's bridge to the other hosts'
        (no learning, no multicast: forwarding entries come from the store),
        and the bridge's MAC the same on every host: the gateway is one
        address and one MAC everywhere (an anycast gateway), so a container's
        configuration is the same on whichever host it starts."""
        br = self._index(self.bridge)
        name = self.overlay_name()
        idx = self._index(name)
        if idx is not None:
            data = self.ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
            if data.get_attr("IFLA_VXLAN_ID") != vxlan_id or data.get_attr("IFLA_VXLAN_LOCAL") != local:
                self.ipr.link("del", index=idx)
                idx = None
        if idx is None:
            lower = [a["index"] for a in self.ipr.get_addr(family=socket.AF_INET) if a.get_attr("IFA_ADDRESS") == local]
            if not lower:
                raise WiringError(
                    f"[cluster] underlay = {local!r} is no address of this host: give the address the other "
                    "hosts reach this one at (`ip -4 addr`)"
                )
            try:
                # on the underlay's device: the overlay's MTU is that one's less 50
                self.ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vxlan_id, vxlan_local=local,
                              vxlan_link=lower[0], vxlan_port=4789, vxlan_learning=0)
            except NetlinkError as e:
                raise WiringError(
                    f"cannot make the overlay device {name} (vxlan id {vxlan_id}, local {local}): "
                    f"{os.strerror(e.code)}: check [cluster] underlay is an address of this host and "
                    "vxlan_id is not used by another device"
                ) from e
            idx = self._index(name)
        self.ipr.link("set", index=br, address=gateway_mac)
        self.ipr.link("set", index=idx, master=br, state="up")
        # a bridge does not fragment, nor tell the sender to: a container's
        # frames must fit the overlay (the underlay's MTU less VXLAN's 50)
        self.mtu = self.ipr.get_links(idx)[0].get_attr("IFLA_MTU")
        # ARP is answered on each host from the neighbours below, never sent
        # across the overlay; the gateway's own address, on every host, is
        # answered by the local bridge only (the kernel's neigh_suppress does
        # both, as for EVPN); no MAC is learnt from the overlay
        self.ipr.brport("set", index=idx, neigh_suppress=1, learning=0)

    def overlay_entries(self) -> tuple[set[tuple[str, str]], set[str], dict[str, str]]:
        """What the overlay holds now: the overlay device's (MAC, remote
        VTEP) entries, the MACs the bridge sends to the overlay port (static
        entries), and the bridge's permanent neighbours (address -> MAC)."""
        vx, br = self._index(self.overlay_name()), self._index(self.bridge)
        remote, static = set(), set()
        if vx is not None:
            for e in self.ipr.fdb("dump", ifindex=vx):
                if e["ifindex"] != vx:
                    continue
                if e.get_attr("NDA_DST"):
                    remote.add((e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST")))
                elif e.get_attr("NDA_MASTER") and e["state"] & NUD_NOARP:
                    static.add(e.get_attr("NDA_LLADDR"))
        neigh = {}
        for n in self.ipr.get_neighbours(ifindex=br, family=socket.AF_INET):
            if n["state"] & NUD_PERMANENT and n.get_attr("NDA_LLADDR"):
                neigh[n.get_attr("NDA_DST")] = n.get_attr("NDA_LLADDR")
        return remote, static, neigh

    def sync_overlay(self, fdb: set[tuple[str, str]], neigh: dict[str, str]) -> int:
        """Make the overlay hold exactly `fdb`, (MAC, VTEP) pairs: each other
        host's containers, and 00:00:00:00:00:00 to every other host for
        broadcasts (head-end replication); each container MAC also a static
        entry of the bridge on the overlay port; and `neigh` (their addresses:
        ARP answered on this host, for its containers and itself). Returns
        the entries changed."""
        vx, br = self._index(self.overlay_name()), self._index(self.bridge)
        if vx is None:
            return 0
        have, static, have_neigh = self.overlay_entries()
        macs = {mac for mac, _ in fdb if mac != ZERO_MAC}
        n = 0
        for mac, dst in have - fdb:
            self._quiet(self.ipr.fdb, "del", ifindex=vx, lladdr=mac, dst=dst, flags=NTF_SELF)
            n += 1
        for mac, dst in fdb - have:
            # a container MAC has one VTEP (append would add a second)
            self.ipr.fdb("append" if mac == ZERO_MAC else "replace", ifindex=vx, lladdr=mac, dst=dst, flags=NTF_SELF,
                         state=NUD_PERMANENT | NUD_NOARP)
            n += 1
        for mac in static - macs:
            self._quiet(self.ipr.fdb, "del", ifindex=vx, lladdr=mac, flags=NTF_MASTER, master=br)
            n += 1
        for mac in macs - static:  # the bridge sends it to the overlay port, never floods it
            self.ipr.fdb("replace", ifindex=vx, lladdr=mac, flags=NTF_MASTER, state=NUD_NOARP, master=br)
            n += 1
        for ip in have_neigh.keys() - neigh.keys():
            self._quiet(self.ipr.neigh, "del", dst=ip, ifindex=br)
            n += 1
        for ip, mac in neigh.items():
            if have_neigh.get(ip) != mac:
                self.ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=br, state=NUD_PERMANENT)
                n += 1
        return n

    def _quiet(self, fn, *args, **kw) -> None:
        """A netlink delete of what may be gone already."""
        try:
            fn(*args, **kw)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ENODEV):
                raise

    def delete_overlay(self) -> None:
        idx = self._index(self.overlay_name())
        if idx is not None:
            self.ipr.link("del", index=idx)


NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
NTF_MASTER = 0x04
ZERO_MAC = "00:00:00:00:00:00"


def _free_name(ipr: IPRoute) -> str:
    """The first ethN (N >= 1) a netns has no interface of."""
    names = {ln.get_attr("IFLA_IFNAME") for ln in ipr.get_links()}
    return next(f"eth{n}" for n in range(1, 1000) if f"eth{n}" not in names)


def _index_of(ipr: IPRoute, ifname: str) -> int | None:
    """One RTM_GETLINK by name (link_lookup dumps every link on the host:
    slow with a thousand veths)."""
    try:
        return ipr.link("get", ifname=ifname)[0]["index"]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _open_netns(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    except OSError as e:
        raise WiringError(f"the netns of pid {pid} is gone ({e.strerror}): the container exited early") from e
