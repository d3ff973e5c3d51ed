"""The file server: the process that answers FUSE requests (<run_dir>/fsd.pid).

    python -m fused.fs.server --run-dir DIR --fd N [--fresh] [--passthrough 0|1]

(--passthrough: what INIT negotiated when an older file server set up the
connection; this one never asks for it, see handlers.py.)

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
import threading
import time
from dataclasses import dataclass, field

from ..channel import listen, recv_frame, send_frame
from ..child import begin, log_format  # noqa: F401 - log_format: tether-fused's, from here
from . import handlers as h
from . import wire

log = logging.getLogger("tether.fsd")

BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
TABLE_SIZE = 1 << 20  # 32,768 inodes with a backing file (an older server's)
SPIN = float(os.environ.get("TETHER_FSD_SPIN_US", "30")) / 1e6
INSTALL_WAIT = 0.05  # s: the longest a publish waits for a moment with no request waiting (then it goes all the same)

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
    """The backing files an older file server registered on the connection."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

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


@dataclass
class Install:
    """A snapshot to put in place (or, snap None, attributes to invalidate),
    carried out by the FUSE thread."""

    snap: h.Snapshot | None
    everything: bool = False  # invalidate every file of the snapshot (a server that just started)
    inval: list[int] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)  # files whose new size the kernel has taken
    shrunk: list[int] = field(default_factory=list)  # filled in: the files that got shorter
    settling: list[int] = field(default_factory=list)  # filled in: the files to stat
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def quiet_only(self) -> bool:
        """It writes invalidations: only while no attribute request waits."""
        return bool(self.snap is not None or self.inval)


class Server:
    def __init__(self, run_dir: str, fd: int, fresh: bool, passthrough: bool, tree_fd: int | None = None) -> None:
        self.run_dir = run_dir
        self.fd = fd
        self.tree_fd = tree_fd
        self.fresh = fresh
        table = h.OpenTable(open_table(os.path.join(run_dir, "fsd.table")))
        self.handlers = h.Handlers(IoctlBacking(fd), table)
        if not fresh:  # the connection was negotiated by a server before us
            self.handlers.passthrough = passthrough
        self.handlers.on_init = self._negotiated
        self.ready = threading.Event()  # set by the first publish
        self.seq = 0
        # Snapshots are put in place by the FUSE loop, between requests, when
        # none is waiting: an invalidation must never overtake an attribute
        # reply the kernel is waiting for (it would drop that reply and keep
        # the old size, see handlers.py). Before the loop runs, by the publisher.
        self._built = self.handlers.snap  # the last snapshot built from the channel
        self._queue: list[Install] = []
        self._lock = threading.Lock()
        self._looping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
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
        """Serve the snapshot `msg` carries; returns once it is in place."""
        old = self._built
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
        self._built = snap
        # a server that just started cannot know what the kernel caches
        everything = bool(msg.get("full")) and not self.ready.is_set()
        job = Install(snap, everything)
        self._put(job)
        if job.settling:
            self._settle(job.settling)
        if job.shrunk:
            self._teach_sizes(job.shrunk)
        self.seq = msg.get("seq", self.seq)
        self.ready.set()

    def _put(self, job: Install) -> None:
        """Have the FUSE thread carry `job` out (this thread, before it runs),
        and return once it is done."""
        with self._lock:
            if self._looping:
                self._queue.append(job)
                os.write(self._wake_w, b"!")
            else:
                self._carry_out(job)
        job.done.wait()

    def _settle(self, inodes: list[int]) -> None:
        """stat each changed file: the attribute request that the kernel
        surely takes (handlers.py), or none when it took one already."""
        self.handlers.prober = threading.get_native_id()
        for i in inodes:
            rel = self.handlers.path(i)
            if rel is not None:
                try:
                    os.stat(os.path.join(self.run_dir, "fs", rel))
                except OSError:
                    pass
        self._put(Install(None, settled=inodes))

    def _carry_out(self, job: Install) -> None:
        hd = self.handlers
        try:
            if job.snap is None:  # the attributes of files whose size the kernel now knows
                changed = job.inval
                for i in changed:
                    hd.shrinking.pop(i, None)
                hd.settled(job.settled)
            else:
                changed = hd.publish(job.snap)
                if job.everything:
                    changed = [k * h.STRIDE + 1 + i for k in job.snap.by_key for i in range(len(h.FILES))]
                else:
                    job.shrunk = hd.defer_shrinks(changed)
                    if job.shrunk:
                        held = set(job.shrunk)
                        changed = [i for i in changed if i not in held]
                    job.settling = [i for i in changed if hd.path(i) is not None]
                    hd.settling.update(job.settling)
            for ino in changed:
                self.notify(wire.notify_inval_inode(ino))
        finally:
            job.done.set()

    def _teach_sizes(self, shrunk: list[int]) -> None:
        """Files that got shorter: read each through the page cache (sendfile),
        the READ that tells the kernel the smaller size (handlers.py), then
        invalidate their attributes. A file that cannot be read here (the
        mount is gone from this namespace) is invalidated all the same."""
        self.handlers.prober = threading.get_native_id()
        with open(os.devnull, "wb") as sink:
            for i in shrunk:
                rel = self.handlers.path(i)
                if rel is None:
                    continue
                try:
                    fd = os.open(os.path.join(self.run_dir, "fs", rel), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    os.sendfile(sink.fileno(), fd, 0, 1 << 20)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        self._put(Install(None, inval=shrunk))

    def _install_queued(self) -> None:
        """On the FUSE thread: the jobs published meanwhile, in order."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            queued, self._queue[:] = list(self._queue), []
        for job in queued:
            self._carry_out(job)

    def _carry_out_unquiet(self) -> None:
        """On the FUSE thread, with requests waiting: the jobs that write no
        invalidation (a settled size) need no quiet moment; the first that
        does stops there, and the rest keep their order."""
        with self._lock:
            n = 0
            while n < len(self._queue) and not self._queue[n].quiet_only:
                n += 1
            ready, self._queue[:n] = self._queue[:n], []
        for job in ready:
            self._carry_out(job)

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

    def _write_due(self, replies: list[bytes]) -> None:
        for out in replies:
            try:
                os.write(self.fd, out)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENODEV):  # ENOENT: interrupted meanwhile
                    raise

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
        poller.register(self._wake_r, select.POLLIN)
        wait, clock, spin, yield_ = poller.poll, time.perf_counter, SPIN, os.sched_yield
        queue, install = self._queue, self._install_queued
        with self._lock:
            self._looping = True
        idle_since = 0.0
        busy_since = 0.0
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
                if hd.deferred:  # replies held back while a sendfile may read the size
                    self._write_due(hd.due())
                if queue and hd.attrs_deferred():
                    self._carry_out_unquiet()
                    self._write_due(hd.due())
                if queue and not hd.attrs_deferred():
                    # no request waits, here or held back: the moment to put a
                    # snapshot in place (an invalidation would make the kernel
                    # drop an attribute reply it is still waiting for)
                    install()
                    busy_since = 0.0
                if hd.deferred:
                    wait(1)
                    continue
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
            if queue and not queue[0].quiet_only:
                self._carry_out_unquiet()
            if hd.deferred:
                self._write_due(hd.due())
            if queue:  # requests keep coming: a publish waits INSTALL_WAIT at most
                now = clock()
                if not busy_since:
                    busy_since = now
                elif now - busy_since > INSTALL_WAIT:
                    install()
                    busy_since = 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tether-fsd", description="tether's file server (started by tether-fused)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--tree-fd", type=int, help="a detached clone of the mount, handed over with the connection")
    p.add_argument("--fresh", action="store_true", help="a new mount: answer INIT")
    p.add_argument("--passthrough", type=int, default=0, help="what INIT negotiated (when not --fresh)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--check", action="store_true", help="import everything, then exit 0 (before an upgrade)")
    a = begin(p, code_version, argv)
    srv = Server(a.run_dir, a.fd, a.fresh, bool(a.passthrough), a.tree_fd)
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
