"""tether-fused's side of the served files: the FUSE connection, the file
server process that answers it, and publishing snapshots to that process.

The connection (the /dev/fuse fd) is held here, by the file server and, under
systemd, in the unit's fd store: whichever process dies, the others keep it
open and the mount stays up. At start, in this order, we take over:
  1. a running file server's connection (it hands the fd over, SCM_RIGHTS);
  2. the fd systemd kept for us (LISTEN_FDNAMES "fuse");
  3. nothing to take over: a new mount (a stale one is detached first).
A thread then watches the file server (restarting it with the same fd, which
resends what the dead one had not answered) and the mount point (a mount that
someone removed is logged and reported, never called healthy).

We also keep a detached clone of the mount (open_tree): when someone unmounts
<run_dir>/fs, the next start of tether-fused attaches it again, and running
containers, whose bind mounts share the connection, never notice.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from .. import child
from ..child import read_pid  # noqa: F401 - the daemon's and doctor's, from here
from .server import code_version

log = logging.getLogger("tether.fs")

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 4, -100
MAX_READ = 1 << 17
NAME, MODULE = "fsd", "fused.fs.server"  # <run_dir>/fsd.pid, fsd.sock; `python -m fused.fs.server`
ACK_TIMEOUT = 5.0
MOUNT_CHECK_INTERVAL = 1.0

_libc = ctypes.CDLL(None, use_errno=True)


class MountError(Exception):
    """The served files cannot be mounted; the message says why and what to do."""


def unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(mountinfo: str, path: str) -> list[tuple[str, str]]:
    """(fstype, source) of every mount at `path`, bottom first (the last one is
    what the path shows)."""
    out = []
    for ln in mountinfo.splitlines():
        left, sep, right = ln.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        if unescape_mountinfo(fields[4]) == path:
            r = right.split()
            out.append((r[0] if r else "?", r[1] if len(r) > 1 else "?"))
    return out


def mount_type(path: str) -> str | None:
    """The filesystem type mounted at `path` (the top one), from mountinfo:
    never by stat(), which a hung FUSE server would block."""
    want = os.path.join(os.path.realpath(os.path.dirname(path.rstrip("/")) or "/"), os.path.basename(path.rstrip("/")))
    with open("/proc/self/mountinfo") as f:
        found = mounts_at(f.read(), want)
    return found[-1][0] if found else None


def detach(path) -> bool:
    """Lazily unmount whatever is at `path` (e.g. a mount a crashed daemon left)."""
    path = str(path)
    if mount_type(path) is None:
        return False
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        log.warning("cannot unmount %s: %s", path, os.strerror(ctypes.get_errno()))
        return False
    log.info("unmounted %s", path)
    return True


def _clone_mount(path: str) -> int | None:
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
    return fd if fd >= 0 else None


def _attach(tree_fd: int, path: str) -> bool:
    return _libc.syscall(SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH) == 0


def file_server_pid(run_dir: Path) -> int | None:
    """The pid in <run_dir>/fsd.pid if that process is tether's file server
    for this run_dir (a stale pid file may name any process: never signal it)."""
    return child.running(Path(run_dir), NAME, MODULE)


def _as_tuple(fs) -> tuple[bytes, bytes, bytes, bytes]:
    return (fs.hosts, fs.ports, fs.env, fs.resolv)


class FileService:
    def __init__(self, run_dir: Path, fs_dir: Path, log_level: str = "info") -> None:
        self.run_dir = Path(run_dir)
        self.fs_dir = Path(fs_dir)
        self.log_level = log_level
        self.fd: int | None = None
        self.tree_fd: int | None = None
        self.passthrough = False  # an older file server negotiated it on this connection
        self.child = child.Child(self.run_dir, NAME, MODULE, label="file server")
        self.lock = threading.RLock()
        self.latest = None  # the last snapshot published (render.Snapshot)
        self._sent: dict | None = None  # name -> FileSet as the file server has it
        self._seq = 0
        self.problem: str | None = None  # why the files are not healthy, for ps/doctor/register
        self.restarts = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._mount_checked = 0.0

    @property
    def pid(self) -> int | None:
        return self.child.pid

    @property
    def conn(self):
        """The file server's channel; None while there is none (the service's
        sign that a publish was not acknowledged)."""
        return self.child.conn

    @property
    def sock_path(self) -> Path:
        return self.child.sock_path

    # --- start ---------------------------------------------------------------------------
    def start(self) -> str:
        """Take over or make the connection, and have a file server answer it.
        Returns how ("took over file server N", "systemd fd store", "new mount")."""
        how = self._take_over()
        if how is None:
            fd = _systemd_fd("fuse")
            kept = None if fd is not None else keeper_fds(self.run_dir)
            if fd is None and kept is None and keeper_pid(self.run_dir) is not None:
                raise MountError(
                    f"cannot copy the FUSE connection out of {KEEPER_NAME} {keeper_pid(self.run_dir)} "
                    "(pidfd_getfd needs ptrace rights): `tether-fused --cleanup` takes everything down "
                    "(running containers then lose their files), then start tether-fused"
                )
            if fd is not None and _aborted(fd):
                log.warning("the FUSE connection in systemd's fd store was aborted: mounting anew "
                            "(containers started before it need a restart: `tether doctor` names them)")
                for dead in (fd, _systemd_fd("fuse-tree")):
                    if dead is not None:
                        os.close(dead)
                fd = None
            if kept is not None and _aborted(kept[0]):
                log.warning("the FUSE connection %s kept was aborted: mounting anew "
                            "(containers started before it need a restart: `tether doctor` names them)", KEEPER_NAME)
                for dead in kept:
                    if dead is not None:
                        os.close(dead)
                kept = None
            if fd is not None:
                self.fd = fd
                self.tree_fd = _systemd_fd("fuse-tree")
                self._spawn(fresh=False)
                how = "the connection kept in systemd's fd store"
            elif kept is not None:
                self.fd, self.tree_fd = kept
                self._spawn(fresh=False)
                how = f"the connection kept by {KEEPER_NAME}"
            else:
                self._mount()
                self._spawn(fresh=True)
                _start_keeper(self.run_dir, self.fd, self.tree_fd)
                # nothing can be registered on a mount this new: serve the
                # defaults at once (a fresh server answers nothing before a snapshot)
                self.publish(_EMPTY)
                how = "a new mount"
        if mount_type(str(self.fs_dir)) != "fuse.tether":
            if self.tree_fd is not None and _attach(self.tree_fd, str(self.fs_dir)):
                log.warning("the FUSE mount at %s was gone: attached it again (running containers never lost it)", self.fs_dir)
                os.close(self.tree_fd)
                self.tree_fd = _clone_mount(str(self.fs_dir))
                if self.tree_fd is not None and self.conn is not None:  # the file server keeps the new spare
                    with self.lock:
                        try:
                            self.child.call({"op": "tree"}, ACK_TIMEOUT, fds=[self.tree_fd])
                        except (OSError, ValueError) as e:
                            log.warning("could not give the file server the mount's new clone: %s", e)
            else:
                self.problem = f"nothing is mounted at {self.fs_dir}"
        _store_fds({"fuse": self.fd, "fuse-tree": self.tree_fd})
        self._watcher = threading.Thread(target=self.child.watch, args=(self._restart, self._stop, self._check_mount_due),
                                         name="tether-fs-watch", daemon=True)
        self._watcher.start()
        return how

    def _take_over(self) -> str | None:
        pid = file_server_pid(self.run_dir)
        if pid is None:
            return None
        fds: list[int] = []
        try:
            hello = self.child.adopt(pid)
            msg, fds = self.child.call({"op": "handover"}, timeout=5.0, with_fds=True)
            if not fds:
                raise ValueError("no connection handed over")
        except ProcessLookupError:
            return None  # it has just ended: nothing to take over
        except (OSError, ValueError) as e:
            for fd in fds:
                os.close(fd)
            self.child.release()
            # it holds the connection running containers read through: never
            # kill it to mount anew; say so and let the admin choose
            raise MountError(
                f"file server {pid} does not hand its FUSE connection over ({e}): restart tether-fused to try "
                f"again; `tether-fused --cleanup` takes everything down (running containers then lose their files)"
            ) from None
        self.fd = fds[0]
        self.tree_fd = fds[1] if len(fds) > 1 else None
        for extra in fds[2:]:
            os.close(extra)
        self.passthrough = bool(msg.get("passthrough"))
        if hello.get("version") != code_version():
            return self._upgrade(hello.get("version"))
        return f"took over the connection of file server {self.pid}"

    def _upgrade(self, theirs) -> str:
        """A file server of other code: replace it by one of ours, on the same
        connection (the kernel resends what the old one held). Only once ours
        is known to start: a broken install keeps the old one serving."""
        problem = child.check_code(MODULE)
        if problem is not None:
            log.error("this installation's file server cannot start (%s): file server %d (code %s) keeps serving",
                      problem, self.pid, theirs)
            return f"took over the connection of file server {self.pid} (not upgraded: see above)"
        old = self.pid
        log.info("file server %d runs other code (%s): replacing it", old, theirs)
        try:
            self.child.call({"op": "stop"}, timeout=5.0)
        except (OSError, ValueError):
            pass
        self.child.forget()
        self._spawn(fresh=False)
        return f"replaced file server {old} (other code) on its connection"

    def _mount(self) -> None:
        detach(self.fs_dir)
        for stale in (file_server_pid(self.run_dir), keeper_pid(self.run_dir)):
            if stale is not None:
                child.terminate(stale)
        for stale in ("fsd.table", "fsd.sock", "fsd.pid", "fsd.passthrough", "keeper.pid"):
            try:
                (self.run_dir / stale).unlink()
            except FileNotFoundError:
                pass
        self.fs_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"cannot open /dev/fuse: {e.strerror}: `modprobe fuse` (see `tether doctor`)") from None
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_READ}"
        rc = _libc.mount(b"tether", str(self.fs_dir).encode(), b"fuse.tether", MS_RDONLY | MS_NOSUID | MS_NODEV, opts.encode())
        if rc != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"cannot mount FUSE at {self.fs_dir}: {os.strerror(err)} (see `tether doctor`)")
        self.fd = fd
        self.tree_fd = _clone_mount(str(self.fs_dir))

    def _spawn(self, fresh: bool) -> None:
        """Start a file server on our fd and wait until it answers."""
        args = ["--fd", str(self.fd), "--log-level", self.log_level]
        if not fresh:  # what INIT negotiated: the first file server wrote it down
            try:
                self.passthrough = (self.run_dir / "fsd.passthrough").read_text().strip() == "1"
            except OSError:
                pass
        args += ["--fresh"] if fresh else ["--passthrough", "1" if self.passthrough else "0"]
        fds = [self.fd]
        if self.tree_fd is not None:  # the file server keeps the clone too, for a later tether-fused
            args += ["--tree-fd", str(self.tree_fd)]
            fds.append(self.tree_fd)
        try:
            self.child.spawn(args, fds)
        except child.ChildError as e:
            raise MountError(str(e)) from None
        self._sent = None

    # --- publishing ------------------------------------------------------------------------
    def publish(self, snap) -> None:
        """Hand a render.Snapshot to the file server; returns once it serves it
        (or at once when there is no file server right now: the next one gets
        the latest snapshot before it answers anything)."""
        with self.lock:
            self.latest = snap
            if self.conn is None:
                return
            self._seq += 1
            if self._sent is None:
                msg = {"op": "publish", "seq": self._seq, "full": True,
                       "files": {n: _as_tuple(f) for n, f in snap.files.items()}}
            else:
                sent = self._sent
                msg = {"op": "publish", "seq": self._seq, "full": False,
                       "files": {n: _as_tuple(f) for n, f in snap.files.items() if sent.get(n) is not f and sent.get(n) != f},
                       "gone": [n for n in sent if n not in snap.files]}
            msg["default"] = _as_tuple(snap.default)
            msg["mtime_ns"] = snap.mtime_ns
            try:
                self.child.call(msg, ACK_TIMEOUT)
            except (OSError, ValueError) as e:
                log.warning("file server %s did not take the snapshot (%s): restarting it", self.pid, e)
                self.child.kill()  # the watcher starts another
                return
            self._sent = dict(snap.files)

    # --- watching ------------------------------------------------------------------------------
    def _restart(self) -> bool:
        """A new file server on the same connection; False: not now (retry)."""
        with self.lock:
            dead = self.pid
            self.child.forget()
            if _aborted(self.fd):
                if self.problem != ABORTED:
                    self.problem = ABORTED
                    log.error("the FUSE connection was aborted (umount -f, or a write to its abort file): "
                              "containers' files fail until they restart; restart tether-fused to mount anew")
                return False
            log.warning("file server %s is gone: starting another on the same FUSE connection", dead)
            try:
                self._spawn(fresh=False)
            except MountError as e:
                log.error("cannot restart the file server: %s", e)
                self.problem = f"no file server answers the mount ({e})"
                return False
            if self.problem and self.problem.startswith("no file server"):
                self.problem = None
            self.restarts += 1
            if self.latest is not None:
                self.publish(self.latest)
            log.info("file server %d serves the mount again", self.pid)
            return True

    def _check_mount_due(self) -> None:
        """Each round of the watcher (child.watch): the mount, once a second."""
        now = time.monotonic()
        if now - self._mount_checked >= MOUNT_CHECK_INTERVAL:
            self._mount_checked = now
            self._check_mount()

    def _check_mount(self) -> None:
        try:
            kind = mount_type(str(self.fs_dir))
        except OSError:
            return
        if kind == "fuse.tether" and _aborted(self.fd):
            self.problem = ABORTED  # mounted, but nothing answers it any more: never healthy
        elif kind == "fuse.tether":
            if self.problem:
                log.info("the FUSE mount at %s is back", self.fs_dir)
            self.problem = None
        elif self.problem is None:
            self.problem = f"nothing is mounted at {self.fs_dir}" if kind is None else f"{self.fs_dir} is a {kind} mount, not tether's"
            log.error(
                "the FUSE mount is gone: %s (someone unmounted it). Running containers keep their files; "
                "new containers cannot start until tether-fused is restarted, which attaches it again",
                self.problem,
            )

    def close(self) -> None:
        """Stop watching; the file server keeps serving (a restart takes over)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        with self.lock:
            self.child.release()
        for fd in (self.fd, self.tree_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.tree_fd = None


ABORTED = "the FUSE connection was aborted"


class _Empty:
    """A render.Snapshot with no container: what a new mount serves first."""

    files: dict = {}
    mtime_ns = 0

    class default:  # noqa: N801 - the FileSet shape
        hosts = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ports = env = resolv = b""


_EMPTY = _Empty()


def _aborted(fd: int | None) -> bool:
    """Whether the kernel ended the connection behind `fd` (POLLERR)."""
    if fd is None:
        return False
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))


def stop_all(run_dir: Path, fs_dir: Path) -> list[str]:
    """--cleanup: stop the file server, unmount, remove its files. Returns what it did."""
    done = []
    pid = file_server_pid(Path(run_dir))
    if pid is not None:
        child.terminate(pid)
        done.append(f"stopped file server {pid}")
    keeper = keeper_pid(Path(run_dir))
    if keeper is not None:
        child.terminate(keeper)
        done.append(f"stopped {KEEPER_NAME} {keeper}")
    if detach(fs_dir):
        done.append(f"unmounted {fs_dir}")
    for name in ("fsd.sock", "fsd.pid", "fsd.table", "fsd.passthrough", "keeper.pid"):
        try:
            (Path(run_dir) / name).unlink()
        except FileNotFoundError:
            pass
    return done


# --- the keeper: a third holder of the connection, without systemd -----------------------
# tether-fused and the file server could die in the same moment (an OOM kill,
# a `pkill -9 -f tether`): then nothing would hold the connection and every
# container's files would fail. The keeper is `sleep infinity` holding the
# fds (nothing to crash); the next tether-fused copies them out of it with
# pidfd_getfd(2). Under systemd the fd store does the same; both are harmless.
KEEPER_NAME = "tether-fuse-keeper"
SYS_PIDFD_GETFD = 438


def _start_keeper(run_dir: Path, fd: int, tree_fd: int | None) -> None:
    sleep = shutil.which("sleep")
    if sleep is None:
        return
    fds = [fd] + ([tree_fd] if tree_fd is not None else [])
    p = subprocess.Popen([f"{KEEPER_NAME}:{run_dir}", "infinity"], executable=sleep, pass_fds=fds, start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = Path(run_dir) / "keeper.pid.tmp"
    tmp.write_text(" ".join(str(x) for x in [p.pid, *fds]) + "\n")
    os.replace(tmp, Path(run_dir) / "keeper.pid")


def keeper_pid(run_dir: Path) -> int | None:
    """The keeper's pid if <run_dir>/keeper.pid names this run_dir's keeper."""
    try:
        pid = int((Path(run_dir) / "keeper.pid").read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if argv[:1] == [f"{KEEPER_NAME}:{run_dir}".encode()] else None


def keeper_fds(run_dir: Path) -> tuple[int, int | None] | None:
    """Copies of the connection (and the mount's clone) the keeper holds."""
    pid = keeper_pid(run_dir)
    if pid is None:
        return None
    try:
        numbers = [int(x) for x in (Path(run_dir) / "keeper.pid").read_text().split()[1:]]
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        got = [_libc.syscall(SYS_PIDFD_GETFD, pidfd, n, 0) for n in numbers]
    finally:
        os.close(pidfd)
    if not got or got[0] < 0 or os.readlink(f"/proc/self/fd/{got[0]}") != "/dev/fuse":
        for fd in got:
            if fd >= 0:
                os.close(fd)
        return None
    for fd in got:
        os.set_inheritable(fd, False)
    return got[0], (got[1] if len(got) > 1 and got[1] >= 0 else None)


# --- systemd's fd store -------------------------------------------------------------------
def _systemd_fd(name: str) -> int | None:
    """An fd systemd passed us under `name` (LISTEN_FDNAMES), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for i, n in enumerate(names[:count]):
        if n == name:
            os.set_inheritable(3 + i, False)
            return 3 + i
    return None


def _store_fds(fds: dict[str, int | None]) -> None:
    """Give systemd a copy of each fd (FDSTORE=1): it outlives every process of ours."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    import array

    for name, fd in fds.items():
        if fd is None:
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                poll = "\nFDPOLL=0" if name == "fuse-tree" else ""  # an O_PATH fd: nothing to poll
                s.sendmsg([f"FDSTORE=1\nFDNAME={name}{poll}".encode()],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, addr)
            except OSError as e:
                log.warning("systemd fd store: %s", e)
