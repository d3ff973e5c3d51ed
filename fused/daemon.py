"""tether-fused: the daemon. Root nursery: control socket, reconcile, signals."""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import logging
import os
import signal
import socket
import sys

import trio

from . import config as config_mod
from . import control
from .dns.supervisor import DnsError, DnsService
from .dns.supervisor import stop_all as stop_dns
from .fs import session
from .fs.server import log_format
from .net import firewall as fw
from .net.wiring import Wiring, Worker
from .service import Service
from .errors import FirewallError, ServiceError, WiringError
from .store.sqlite import SqliteStore, StoreDamaged, StoreError, quarantine

log = logging.getLogger("tether")


def sd_notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), addr)


def _prepare_run_dir(cfg: config_mod.Config) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.run_dir, 0o700)


class AlreadyRunning(Exception):
    pass


def _lock(cfg: config_mod.Config) -> int:
    """One tether-fused per run_dir: an flock held for the process's life.
    A second one stops here, before it touches anything of the first's."""
    fd = os.open(cfg.run_dir / "fused.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = session.read_pid(cfg.run_dir / "fused.pid")
        raise AlreadyRunning(
            f"already running, pid {pid if pid else '?'} (run_dir {cfg.run_dir}): "
            "stop it first (`systemctl stop tether-fused`), or give this one another run_dir"
        ) from None
    tmp = cfg.run_dir / "fused.pid.tmp"
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, cfg.run_dir / "fused.pid")
    return fd


def _parts(cfg: config_mod.Config) -> tuple[Wiring, fw.Firewall]:
    net = cfg.network
    wiring = Wiring(net.bridge, str(net.gateway), net.network.prefixlen, isolated=net.isolation == "links",
                    strategy=net.strategy, cluster=cfg.clustered)
    return wiring, fw.make(cfg.firewall.driver, cfg.firewall.chain_prefix)


def open_etcd(cfg: config_mod.Config):
    """The etcd store of several hosts, or a one-line refusal."""
    from .store.etcd import EtcdStore

    try:
        host = cfg.cluster.host_name
    except ValueError as e:
        raise StoreError(str(e)) from None
    if not cfg.cluster.underlay:
        raise StoreError(
            "[store] backend = \"etcd\" needs [cluster] underlay: the address the other hosts reach this one at"
        )
    return EtcdStore(cfg.store.endpoints, cfg.store.prefix, host, cfg.cluster.underlay, cfg.cluster.lease_ttl,
                     cfg.store.timeout)


async def open_store(cfg: config_mod.Config, wiring: Wiring, worker: Worker, rebuild: bool = False) -> SqliteStore:
    """The store, or a one-line refusal: a damaged one is moved aside, and a
    missing or empty one is not taken for "no containers" while some are
    wired on the bridge (their addresses would be handed out again). With
    `rebuild`, a new one (see rebuild.py), but never over a good one."""
    try:
        store = SqliteStore(cfg.db_path)
    except StoreDamaged as e:
        moved = quarantine(cfg.db_path)
        if not rebuild:
            raise StoreError(
                f"{e}: moved it aside to {moved}; running containers keep their network and files; "
                "rebuild the store from them with `tether-fused --rebuild-store`"
            ) from None
        log.warning("%s: moved it aside to %s; rebuilding", e, moved)
        store = SqliteStore(cfg.db_path)
    if rebuild:
        if not store.created:
            n = len(store.snapshot().containers)
            store.close()
            raise StoreError(
                f"the store {cfg.db_path} is readable ({n} container(s)): --rebuild-store is for a missing or "
                "damaged one, and replaces nothing; start tether-fused without it"
            )
        return store
    if store.created:
        wired = await worker.run(wiring.bridge_ports)
        if wired:
            store.close()
            for suffix in ("", "-wal", "-shm"):  # the empty file this start made: the next one must see none
                try:
                    os.unlink(f"{cfg.db_path}{suffix}")
                except FileNotFoundError:
                    pass
            raise StoreError(
                f"the store {cfg.db_path} is missing or empty, while {len(wired)} container(s) are wired on "
                f"{cfg.network.bridge}: an empty store would hand their addresses out again; rebuild it from the "
                "running containers with `tether-fused --rebuild-store` (if none runs any more: "
                "`tether-fused --cleanup` first)"
            )
    return store


async def run(cfg: config_mod.Config, log_level: str = "info", rebuild_from: list[str] | None = None) -> None:
    """`rebuild_from`: rebuild a lost store first (--rebuild-store), looking
    in these runc roots besides runc's default for the containers' ids."""
    _prepare_run_dir(cfg)
    lock = _lock(cfg)
    wiring, firewall = _parts(cfg)  # an unusable firewall driver stops here, before anything is touched
    log.info("firewall: %s driver, prefix %s", fw.choose(cfg.firewall.driver), cfg.firewall.chain_prefix)
    for what in fw.remove_others(cfg.firewall.driver, cfg.firewall.chain_prefix):
        log.warning("firewall: removed %s, left by another driver (the driver is %s now)", what, fw.choose(cfg.firewall.driver))
    files = session.FileService(cfg.run_dir, cfg.fs_dir, log_level)
    responder = None  # the DNS process's supervisor
    store = worker = service = None
    try:
        how = files.start()
        log.info("served files: %s at %s (file server pid %s)", how, cfg.fs_dir, files.pid)
        worker = Worker("tether-kernel")
        changes = None  # several hosts: the etcd watch's nudges, one pending at most
        if cfg.clustered:
            if rebuild_from is not None:
                raise StoreError("--rebuild-store is for the SQLite store; with etcd, the store is the cluster's")
            store = open_etcd(cfg)
            changes_in, changes = trio.open_memory_channel(1)
            token = trio.lowlevel.current_trio_token()

            def nudge() -> None:  # on the trio thread: one pending refresh is enough
                try:
                    changes_in.send_nowait(None)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass

            store.on_change = lambda: token.run_sync_soon(nudge)
        else:
            store = await open_store(cfg, wiring, worker, rebuild=rebuild_from is not None)
        if rebuild_from is not None:  # before the first publish: the file server still serves the last snapshot
            from . import rebuild
            from .net.wiring import netns_inode

            done = await rebuild.rebuild(store, cfg, wiring, worker, rebuild_from, netns_inode)
            for line in done or ["nothing: no running container mounts this daemon's files"]:
                log.info("rebuilt the store: %s", line)
        if cfg.dns.enabled:
            upstreams = cfg.dns.upstream_servers()
            responder = DnsService(cfg.run_dir, str(cfg.network.gateway), cfg.dns.per_client_qps, upstreams,
                                   cfg.dns.search, cfg.dns.timeout, log_level)
        else:
            for line in stop_dns(cfg.run_dir):
                log.info("dns: [dns] enabled = false: %s", line)
        service = Service(
            cfg, store, wiring, firewall, worker, publish=files.publish,
            publish_dns=responder.publish if responder else lambda d: None, files=files,
        )
        await service.start()
        if responder is not None:  # the DNS process answers from the data service.start() published
            how = await trio.to_thread.run_sync(responder.start)
            log.info("dns: %s on %s:53, %d queries/s per source, upstreams %s", how, cfg.network.gateway,
                     cfg.dns.per_client_qps, upstreams or "none (NXDOMAIN)")
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, cfg.socket_path, service.dispatch)
            await nursery.start(service.watch_liveness)
            await nursery.start(service.watch_firewall)
            if changes is not None:
                await nursery.start(service.watch_store, changes)
            nursery.start_soon(trim_memory, service)
            log.info("tether-fused ready: socket %s, bridge %s, subnet %s", cfg.socket_path, cfg.network.bridge, cfg.network.subnet)
            sd_notify("READY=1")
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        try:
                            await service.dispatch("reconcile", {})
                        except (StoreError, ServiceError) as e:  # etcd away, or other hosts writing: said, not fatal
                            log.warning("reconcile (SIGHUP): %s", e)
                        continue
                    log.info(
                        "tether-fused: %s, stopping (containers keep their wiring; file server %s keeps serving)",
                        signal.Signals(sig).name, files.pid,
                    )
                    break
            sd_notify("STOPPING=1")
            nursery.cancel_scope.cancel()
    finally:
        try:
            cfg.socket_path.unlink()
        except FileNotFoundError:
            pass
        if service is not None:  # its last files handed over, its store thread stopped
            service.close()
        files.close()
        if responder is not None:
            responder.close()
        if worker is not None:
            await worker.run(wiring.close)
            worker.shutdown()
        if store is not None:
            store.close()
        try:
            (cfg.run_dir / "fused.pid").unlink()
        except FileNotFoundError:
            pass
        os.close(lock)


def cleanup(cfg: config_mod.Config) -> None:
    """Remove everything this config made: file server, mount, veths, bridge, chains."""
    if cfg.run_dir.exists():
        _prepare_run_dir(cfg)
        _lock(cfg)  # refuses while a tether-fused runs on this run_dir
    done = stop_dns(cfg.run_dir) + session.stop_all(cfg.run_dir, cfg.fs_dir)
    wiring, firewall = _parts(cfg)
    veths = wiring.bridge_ports()
    if wiring.has_bridge():
        done.append(f"removed bridge {cfg.network.bridge}" + (f" and {len(veths)} veth(s)" if veths else ""))
    wiring.delete_bridge()
    wiring.close()
    firewall.teardown()
    done.append(f"removed firewall chains {cfg.firewall.chain_prefix}-* and the jumps into them"
                if fw.choose(cfg.firewall.driver) == "iptables" else
                f"removed firewall table inet {cfg.firewall.chain_prefix}"
                if fw.choose(cfg.firewall.driver) == "nftables" else "firewall: driver none, nothing to remove")
    done += [f"removed {what}, left by another driver" for what in fw.remove_others(cfg.firewall.driver, cfg.firewall.chain_prefix)]
    for line in done:  # what it removed, one line each (stdout: the user asked for it)
        print(f"tether-fused --cleanup: {line}")
    for name in ("fused.sock", "fused.pid", "fused.lock"):
        try:
            (cfg.run_dir / name).unlink()
        except FileNotFoundError:
            pass


def _limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena, and never hands
    their memory back: with the kernel worker, FUSE and trio's threads that is
    most of the daemon's growth. Two arenas, set before any thread starts."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass



TRIM_INTERVAL = 2.0  # s


async def trim_memory(service: Service, interval: float = TRIM_INTERVAL) -> None:
    """Give the memory that a burst of requests freed back to the kernel.
    glibc keeps freed heap (and each thread's arena) mapped: after 1000
    registrations about 5 MiB of the daemon's RSS is free memory nobody uses.
    malloc_trim(0) after any round in which the store changed; a few
    hundred microseconds, and nothing when the daemon is idle."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:  # not glibc
        return
    seen = None
    while True:
        await trio.sleep(interval)
        revision = service.revision  # the last publish's: no store call on this thread
        if revision != seen:
            seen = revision
            trim(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether-fused", description="tether daemon: leases, wiring, served files")
    p.add_argument("--config", help="TOML config (default: $TETHER_CONFIG, else /etc/tether/tether.toml)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--cleanup", action="store_true", help="stop the file server, unmount, remove the bridge and chains this config made, then exit")
    p.add_argument("--rebuild-store", action="store_true",
                   help="the store is missing or damaged while containers run: rebuild it from them, then run")
    p.add_argument("--runc-root", action="append", default=[], metavar="DIR",
                   help="with --rebuild-store: a runc root to find the containers' ids in, besides /run/runc")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format=log_format(), stream=sys.stderr)
    try:
        cfg = config_mod.load(a.config)
    except config_mod.ConfigError as e:
        print(f"tether-fused: {e}", file=sys.stderr)
        sys.exit(1)
    _limit_malloc_arenas()
    if os.geteuid() != 0:
        print("tether-fused: must run as root (it creates bridges, veths and firewall rules)", file=sys.stderr)
        sys.exit(1)
    try:
        if a.cleanup:
            cleanup(cfg)
            return
        trio.run(run, cfg, a.log_level, a.runc_root if a.rebuild_store else None)
    except (StoreError, FirewallError, WiringError, AlreadyRunning, session.MountError, DnsError) as e:
        print(f"tether-fused: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # e.g. run_dir not writable
        print(f"tether-fused: {e.strerror or e}: {e.filename or ''} (run as root; see `tether doctor`)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
