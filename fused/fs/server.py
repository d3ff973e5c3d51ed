"""The file server: the process that answers FUSE requests (<run_dir>/fsd.pid).

    python -m fused.fs.server --run-dir DIR --fd N [--fresh] [--passthrough 0|1]

It serves the snapshots tether-fused publishes to it and does nothing else: no
trio, no netlink, no store, standard library only, so it starts in tens of
milliseconds and has little that can fail. The FUSE connection (fd N) is also
held by tether-fused (and systemd's fd store), so either process can die and
the mount stays up: requests wait in the kernel until a server reads them.

A server that takes over from a dead one asks the kernel to resend what the
dead one had read but not answered (FUSE_NOTIFY_RESEND), and answers only
once it has a snapshot: a reader stalls meanwhile, and never fails.

Publish channel (`<run_dir>/fsd.sock`, root only): frames of a 4-byte length
and a `marshal`led dict, one answer per request.
    {"op": "hello"}                      -> {"pid", "version", "passthrough", "serving", "seq"}
    {"op": "publish", "seq", "full", "files": {name: (4 bytes)}, "gone": [name],
     "default": (4 bytes), "mtime_ns"}   -> {"seq"}      (applied whole, then acked)
    {"op": "handover"}                   -> {"passthrough"} + the FUSE fd and the
                                            mount's detached clone (SCM_RIGHTS)
    {"op": "tree"} + an fd (SCM_RIGHTS)  -> {}   (a new detached clone of the mount to keep)
    {"op": "stop"}                       -> {} and the process exits
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import io
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time

from ..channel import listen, recv_frame, send_frame
from ..child import begin, log_format  # noqa: F401 - log_format: tether-fused's, from here
from . import handlers as h
from . import wire

log = logging.getLogger("tether.fsd")

BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("<iIQ")
TABLE_SIZE = 1 << 20  # 43,690 inodes with a backing file
SPIN = float(os.environ.get("TETHER_FSD_SPIN_US", "30")) / 1e6

_libc = ctypes.CDLL(None, use_errno=True)


def code_version() -> str:
    """A digest of the file server's own code: tether-fused replaces a file
    server whose code differs from its own (an upgrade)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("wire.py", "handlers.py", "server.py", "../channel.py"):
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


class IoctlBacking:
    """Backing files on a FUSE connection: each version an immutable memfd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def open(self, data: bytes) -> int:
        mfd = os.memfd_create("tether", os.MFD_CLOEXEC)
        try:
            os.write(mfd, data)
            arg = ctypes.create_string_buffer(BACKING_MAP.pack(mfd, 0, 0))
            bid = _libc.ioctl(self.fd, BACKING_OPEN, arg)
            if bid < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"FUSE backing file: {os.strerror(err)}")
            return bid
        finally:
            os.close(mfd)

    def close(self, bid: int) -> None:
        _libc.ioctl(self.fd, BACKING_CLOSE, ctypes.byref(ctypes.c_uint32(bid)))


def open_table(path: str) -> mmap.mmap:
    """The open table's memory: a file in run_dir (tmpfs) that outlives us."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != TABLE_SIZE:
            os.ftruncate(fd, TABLE_SIZE)
        return mmap.mmap(fd, TABLE_SIZE)
    finally:
        os.close(fd)


class Server:
    def __init__(self, run_dir: str, fd: int, fresh: bool, passthrough: bool, allow_passthrough: bool,
                 tree_fd: int | None = None) -> None:
        self.run_dir = run_dir
        self.fd = fd
        self.tree_fd = tree_fd
        self.fresh = fresh
        table = h.OpenTable(open_table(os.path.join(run_dir, "fsd.table")))
        self.handlers = h.Handlers(IoctlBacking(fd) if allow_passthrough else None, table)
        if not fresh:  # the connection was negotiated by a server before us
            self.handlers.passthrough = passthrough and allow_passthrough
        self.handlers.on_init = self._negotiated
        self.ready = threading.Event()  # set by the first publish
        self.seq = 0
        self.sock_path = os.path.join(run_dir, "fsd.sock")
        self.version = code_version()

    def _negotiated(self, init: wire.Init) -> None:
        """Only the first server sees INIT: the next ones learn its outcome here."""
        log.info("FUSE protocol 7.%d, passthrough %s", init.minor, "on" if init.passthrough else "off")
        path = os.path.join(self.run_dir, "fsd.passthrough")
        with open(path + ".tmp", "w") as f:
            f.write("1\n" if init.passthrough else "0\n")
        os.replace(path + ".tmp", path)

    # --- publishing -----------------------------------------------------------------
    def apply(self, msg: dict) -> None:
        old = self.handlers.snap
        default = tuple(msg.get("default") or old.default)
        if msg.get("full"):
            snap = h.snapshot(dict(msg["files"]), default, msg.get("mtime_ns", 0))
        else:  # a change touches a few names: so does the work here
            files, by_key = dict(old.files), dict(old.by_key)
            for name in msg.get("gone", ()):
                files.pop(name, None)
                by_key.pop(h.key(name), None)
            for name, fs in msg["files"].items():
                if name not in files:
                    by_key[h.key(name)] = name
                files[name] = fs
            snap = h.Snapshot(files, default, msg.get("mtime_ns", 0), by_key)
        changed = self.handlers.publish(snap)
        if msg.get("full") and not self.ready.is_set():
            # a server that just started cannot know what the kernel caches
            changed = [k * h.STRIDE + 1 + i for k in snap.by_key for i in range(len(h.FILES))]
        for ino in changed:
            self.notify(wire.notify_inval_inode(ino))
        self.seq = msg.get("seq", self.seq)
        self.ready.set()

    def notify(self, msg: bytes) -> None:
        try:
            os.write(self.fd, msg)
        except OSError as e:  # ENOENT: the kernel does not know that inode
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EINVAL, errno.ENOSYS):
                raise

    def client(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    msg, fds = recv_frame(conn, with_fds=True)
                except (OSError, ValueError, EOFError) as e:
                    log.warning("publish channel: %s", e)
                    return
                if msg is None:
                    return
                op = msg.get("op")
                try:
                    if op == "publish":
                        self.apply(msg)
                        send_frame(conn, {"seq": self.seq})
                    elif op == "hello":
                        send_frame(conn, {"pid": os.getpid(), "passthrough": self.handlers.passthrough,
                                          "version": self.version,
                                          "serving": self.ready.is_set(), "seq": self.seq})
                    elif op == "handover":
                        ours = [self.fd] + ([self.tree_fd] if self.tree_fd is not None else [])
                        send_frame(conn, {"passthrough": self.handlers.passthrough}, ours)
                    elif op == "tree" and fds:  # a new spare clone of the mount
                        old, self.tree_fd = self.tree_fd, fds.pop(0)
                        if old is not None:
                            os.close(old)
                        send_frame(conn, {})
                    elif op == "stop":
                        log.info("file server %d: stopping on request", os.getpid())
                        send_frame(conn, {})
                        os._exit(0)
                    else:
                        send_frame(conn, {"error": f"unknown op {op!r}"})
                except OSError as e:
                    log.warning("publish channel: %s", e)
                    return
                finally:
                    for fd in fds:
                        os.close(fd)

    def listen(self) -> socket.socket:
        return listen(self.sock_path)  # atomically the live server's socket

    def accept_loop(self, s: socket.socket) -> None:
        while True:
            conn, _ = s.accept()
            threading.Thread(target=self.client, args=(conn,), daemon=True).start()

    # --- the FUSE loop -----------------------------------------------------------------
    def serve(self) -> None:
        fd, hd = self.fd, self.handlers
        buf = bytearray(wire.BUFSIZE)
        if self.fresh:
            # a new mount's first request is INIT: answer it now, so that a
            # mount whose daemon never publishes fails nothing and hangs no stat
            while hd.init is None:
                n = os.readv(fd, [buf])
                out = hd.handle(buf, n)
                if out is not None:
                    os.write(fd, out)
        self.ready.wait()
        if not self.fresh:
            self.notify(wire.notify_resend())
        # FileIO answers None, not an exception, when no request is waiting
        readinto, write, handle = io.FileIO(fd, "rb", closefd=False).readinto, os.write, hd.handle
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wait, clock, spin, yield_ = poller.poll, time.perf_counter, SPIN, os.sched_yield
        idle_since = 0.0
        while True:
            try:
                n = readinto(buf)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):  # interrupted meanwhile
                    continue
                if e.errno in (errno.ENODEV, errno.EBADF):  # unmounted everywhere: the connection is gone
                    log.info("file server %d: the FUSE connection ended", os.getpid())
                    return
                raise
            if n is None:
                # a reader in a loop sends its next request within microseconds:
                # poll for it a little before sleeping (a wake-up from another
                # CPU costs tens of microseconds on a small VM)
                now = clock()
                if not idle_since:
                    idle_since = now
                elif now - idle_since > spin:
                    wait()
                    idle_since = 0.0
                    continue
                yield_()  # a reader on this CPU runs first
                continue
            if n == 0:
                return
            try:
                out = handle(buf, n)
            except wire.Malformed as e:
                log.warning("malformed request: %s", e)
                continue
            except Exception:  # a bug: answer EIO for this one request, keep serving
                log.exception("FUSE request failed")
                try:
                    req = wire.parse(buf, n)
                except wire.Malformed:
                    continue
                out = wire.error(req.unique, errno.EIO)
            if out is None:
                continue
            try:
                write(fd, out)
            except OSError as e:
                if e.errno == errno.ENODEV:
                    return
                if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                    raise
                hd.unanswered()
            hd.written()
            idle_since = 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether-fsd", description="tether's file server (started by tether-fused)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--tree-fd", type=int, help="a detached clone of the mount, handed over with the connection")
    p.add_argument("--fresh", action="store_true", help="a new mount: answer INIT")
    p.add_argument("--passthrough", type=int, default=0, help="what INIT negotiated (when not --fresh)")
    p.add_argument("--no-passthrough", action="store_true")
    p.add_argument("--log-level", default="info")
    p.add_argument("--check", action="store_true", help="import everything, then exit 0 (before an upgrade)")
    a = begin(p, code_version, argv)
    srv = Server(a.run_dir, a.fd, a.fresh, bool(a.passthrough), not a.no_passthrough, a.tree_fd)
    listener = srv.listen()
    with open(os.path.join(a.run_dir, "fsd.pid.tmp"), "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(os.path.join(a.run_dir, "fsd.pid.tmp"), os.path.join(a.run_dir, "fsd.pid"))
    threading.Thread(target=srv.accept_loop, args=(listener,), daemon=True, name="publish").start()
    log.info("file server %d: %s", os.getpid(), "new mount" if a.fresh else "took over the FUSE connection")
    try:
        srv.serve()
    except Exception:
        log.exception("file server %d: the FUSE loop failed; tether-fused starts another", os.getpid())
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
