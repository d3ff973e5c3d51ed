"""The served files as each running container sees them: read from inside its
own mount namespace, and compared with what tether serves for its name.

A container reads its files through the FUSE connection its bind mounts were
made from, for as long as it runs. When that connection dies (every process
that held it gone, as in an upgrade from a release whose tether-fused served
the files itself; an abort; `tether-fused --cleanup`), the host's mount can be
new and healthy while the container's /etc/hosts fails with "Transport
endpoint is not connected" until it restarts. `tether doctor` and `tether ps`
name such containers with `check`.

Reads are bounded in time. A FUSE server that hangs blocks every read of its
connection, and a reader whose request it took cannot even be killed; so the
reads run in a child process, one container's files at a time, which the
parent gives `read_timeout` per exchange and `budget` in all, and leaves
behind when it hangs (it ends once the server answers or the connection dies).
A connection that hung once is not read again in the same check.

`mounts_of` and `classify` are pure; `check` does the reading.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fs.session import unescape_mountinfo

READ_TIMEOUT = 2.5  # s per exchange: DESIGN lets a read stall up to 2 s while a tether process comes back
BUDGET = 6.0  # s for the whole check
RETRIES = 2  # a publish between the container's read and tether's: read both again before calling it stale
MAX_BYTES = 1 << 20

# the state of one container's served files
OK, DEAD, STALE, NOT_TETHERS, GONE, UNCHECKED = "ok", "dead", "stale", "not-tethers", "gone", "unchecked"
PROBLEMS = (DEAD, STALE)  # doctor fails on these, ps warns


@dataclass(frozen=True)
class Served:
    """A mount tether makes in a container, and the served file that a read
    of `path` there must return."""

    mount: str
    path: str
    file: str


SERVED = (
    Served("/etc/hosts", "/etc/hosts", "hosts"),
    Served("/etc/tether", "/etc/tether/hosts", "hosts"),
    Served("/etc/resolv.conf", "/etc/resolv.conf", "resolv.conf"),
)


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo file, the fields this check needs."""

    point: str
    device: str  # "major:minor"; for a FUSE mount, its connection
    root: str  # the path inside the mounted filesystem ("/web/hosts")
    fstype: str
    source: str

    @property
    def tethers(self) -> bool:
        """Served by tether's FUSE filesystem (of this release or an older one)."""
        return self.fstype == "fuse.tether" or (self.fstype.startswith("fuse") and self.source == "tether")


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    pid: int


@dataclass(frozen=True)
class Read:
    """What one read returned: the bytes, or why there are none."""

    data: bytes | None = None
    errno: int | None = None
    why: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class Finding:
    name: str
    id: str
    state: str  # OK | DEAD | STALE | NOT_TETHERS | GONE | UNCHECKED
    detail: str
    fix: str = ""
    mount_dead: bool = False  # its files die with tether's mount on the host: that comes back first

    def as_dict(self) -> dict:
        return {"state": self.state, "detail": self.detail, "fix": self.fix}


# --- pure ------------------------------------------------------------------------
def mounts_of(mountinfo: str) -> dict[str, Mount]:
    """The mount each mount point shows (the last, top one) in a mountinfo file."""
    out = {}
    for ln in mountinfo.splitlines():
        left, sep, right = ln.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = unescape_mountinfo(fields[4])
        out[point] = Mount(point, fields[2], unescape_mountinfo(fields[3]), tail[0],
                           unescape_mountinfo(tail[1]) if len(tail) > 1 else "")
    return out


def ours(mounts: dict[str, Mount]) -> list[Served]:
    """The served mounts a container has from tether."""
    return [s for s in SERVED if (m := mounts.get(s.mount)) is not None and m.tethers]


def restart_it(c: Container) -> str:
    return (f"restart the container: `runc kill {c.id} KILL; runc delete {c.id}`, then run it again "
            f"(podman: `podman restart {c.id}`)")


def classify(c: Container, mounts: dict[str, Mount], seen: dict[str, Read], served: dict[str, Read],
             fs_dir: str, fs_device: str | None) -> Finding:
    """What a container's files are, from its mounts (its mountinfo), what
    reads of them returned (`seen`, by path in the container) and what tether
    serves for its name (`served`, by file; a missing or failed one is not
    compared). `fs_device` is the connection of tether's mount at `fs_dir`
    now (None: nothing of tether's is mounted there)."""
    hosts = mounts.get("/etc/hosts")
    mine = ours(mounts)
    if hosts is None or not hosts.tethers:
        what = "the image's own file" if hosts is None else f"a {hosts.fstype} mount ({hosts.source} {hosts.root})"
        also = f" ({', '.join(s.mount for s in mine)} {'is' if len(mine) == 1 else 'are'} tether's)" if mine else ""
        return Finding(c.name, c.id, NOT_TETHERS, f"/etc/hosts is {what}, not tether's{also}",
                       "start it with tether's mounts: runc, a bundle from `tether oci patch`; podman, "
                       "tether's hooks (`tether oci hooks-dir`)")
    for s in mine:
        r = seen.get(s.path)
        if r is None or r.ok:
            continue
        device = mounts[s.mount].device
        why = f"no answer within {READ_TIMEOUT:g} s" if r.timed_out and not r.why else r.why
        if device == fs_device:  # the host's mount is the same connection: it fails as well
            return Finding(c.name, c.id, DEAD, f"{s.path}: {why}: its files come from tether's mount ({device})",
                           f"the mount at {fs_dir} fails as well: restart tether-fused (`systemctl restart "
                           f"tether-fused`; see doctor's mount line), then {restart_it(c)}", mount_dead=True)
        now = f"the mount at {fs_dir} is {fs_device}" if fs_device else f"nothing of tether's is mounted at {fs_dir}"
        return Finding(c.name, c.id, DEAD, f"{s.path}: {why}: its files come from an older FUSE connection "
                       f"({device}; {now}) that nothing serves any more",
                       f"{restart_it(c)}: its new start binds the current mount")
    expected = f"/{c.name}/hosts"
    if hosts.root != expected:
        return Finding(c.name, c.id, STALE, f"/etc/hosts is {hosts.root.lstrip('/')} of tether's mount, not {c.name}'s",
                       f"{restart_it(c)} with its own bundle (`tether oci patch BUNDLE --name {c.name}`)")
    compared = []
    for s in mine:
        r, want = seen.get(s.path), served.get(s.file)
        if r is None or want is None or not want.ok:
            continue
        if r.data != want.data:
            return Finding(c.name, c.id, STALE,
                           f"{s.path} is not what tether serves for {c.name} ({len(r.data)} bytes read, "
                           f"{len(want.data)} served)",
                           f"{restart_it(c)}; if it stays, tether-fused's log says why")
        compared.append(s.path)
    if not compared:
        return Finding(c.name, c.id, OK, f"{', '.join(s.path for s in mine)} read (not compared: tether's own copy "
                       "could not be read)")
    return Finding(c.name, c.id, OK, f"{', '.join(compared)} read what tether serves")


# --- reading ----------------------------------------------------------------------
# The child: reads paths resolved inside a root (openat2 RESOLVE_IN_ROOT: a
# symlink in a container's root cannot lead the host's root to read the host's
# files), one JSON request line in (a root and its paths), one answer line out
# (a result per path). Standard library only.
_CHILD = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY, 0, 0x10 | 0x02)  # RESOLVE_IN_ROOT|NO_MAGICLINKS
def read(root, path, limit):
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = libc.syscall(437, rfd, path.lstrip("/").encode(), ctypes.byref(how), 24)  # openat2
        e = ctypes.get_errno() if fd < 0 else 0
        if e == 38:  # ENOSYS: a kernel before 5.6
            fd, e = os.open(path.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=rfd), 0
        if e:
            raise OSError(e, os.strerror(e))
    finally:
        os.close(rfd)
    with open(fd, "rb") as f:
        return f.read(limit)
def one(root, path, limit):
    try:
        return {"data": read(root, path, limit).decode("latin-1")}
    except OSError as e:
        return {"errno": e.errno, "why": e.strerror or str(e)}
for line in sys.stdin:
    root, paths, limit = json.loads(line)
    sys.stdout.write(json.dumps([one(root, p, limit) for p in paths]) + "\n")
    sys.stdout.flush()
"""


class Reader:
    """Reads files in a child process, each read bounded by a timeout."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
        self.buf = b""
        return self.proc

    def read(self, root: str, paths: list[str], timeout: float) -> list[Read]:
        """Each of `paths` inside `root`, in one exchange with the child (a
        container's files are on one connection: they hang together)."""
        proc = self.proc or self._start()
        deadline = time.monotonic() + timeout
        try:
            proc.stdin.write(json.dumps([root, paths, MAX_BYTES]).encode() + b"\n")
            proc.stdin.flush()
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    self.abandon()
                    return [Read(timed_out=True, why=f"no answer within {timeout:g} s")] * len(paths)
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise OSError("the reading process ended")
                self.buf += chunk
        except OSError as e:
            self.abandon()
            return [Read(why=f"could not be read ({e})")] * len(paths)
        line, _, self.buf = self.buf.partition(b"\n")
        return [Read(data=a["data"].encode("latin-1")) if "data" in a else Read(errno=a.get("errno"), why=a.get("why", "?"))
                for a in json.loads(line)]

    def abandon(self) -> None:
        """Kill the child; one stuck in a FUSE request the server took stays
        until the server answers or the connection dies, and is not waited for."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            try:
                proc.stdin.close()
                proc.wait(timeout=1)
            except (OSError, subprocess.TimeoutExpired):
                self.proc = proc
                self.abandon()
            proc.stdout.close()


def host_mount(run_dir: Path) -> Path:
    """Where tether's files are mounted on the host: the realpath of run_dir
    only (a stat inside a hung mount would block)."""
    return Path(os.path.realpath(run_dir)) / "fs"


def check(fs_dir: Path, containers: list[Container], served_by_daemon: Callable[[str], dict[str, bytes] | None] | None = None,
          budget: float = BUDGET, read_timeout: float = READ_TIMEOUT, proc: str = "/proc") -> list[Finding]:
    """One finding per container, in order. `fs_dir` is tether's mount on the
    host (`host_mount`); what tether serves is read there, or, when that fails,
    asked of `served_by_daemon(name)` (file -> bytes). `proc`: where procfs is
    (the tests give a directory that looks like it)."""
    deadline = time.monotonic() + budget
    fs = str(fs_dir)
    with open(f"{proc}/self/mountinfo") as f:
        top = mounts_of(f.read()).get(fs)
    fs_device = top.device if top is not None and top.tethers else None
    host_ns = os.readlink(f"{proc}/self/ns/mnt")
    reader = Reader()
    hung: set[str] = set()  # connections that did not answer a read: not read again

    def read(root: str, paths: list[str], device: str | None) -> dict[str, Read]:
        """The paths (all on `device`'s connection) by path."""
        if device in hung:
            return dict.fromkeys(paths, Read(timed_out=True, why="not read: its connection did not answer an earlier read"))
        got = reader.read(root, paths, max(0.1, min(read_timeout, deadline - time.monotonic())))
        if any(r.timed_out for r in got) and device is not None:
            hung.add(device)
        return dict(zip(paths, got))

    def look(c: Container, mounts: dict[str, Mount], mine: list[Served]) -> Finding:
        seen: dict[str, Read] = {}
        for device in dict.fromkeys(mounts[s.mount].device for s in mine):
            seen.update(read(f"{proc}/{c.pid}/root", [s.path for s in mine if mounts[s.mount].device == device], device))
        served: dict[str, Read] = {}
        if fs_device is not None:
            files = sorted({s.file for s in mine})
            served = dict(zip(files, read("/", [f"{fs}/{c.name}/{f}" for f in files], fs_device).values()))
        missing = [s.file for s in mine if not (s.file in served and served[s.file].ok)]
        if missing and served_by_daemon is not None:  # the host's mount fails: the daemon's word
            files = served_by_daemon(c.name) or {}
            served.update({f: Read(data=files[f]) for f in missing if f in files})
        return classify(c, mounts, seen, served, fs, fs_device)

    findings = []
    try:
        for c in containers:
            if time.monotonic() >= deadline:
                findings.append(Finding(c.name, c.id, UNCHECKED, f"not checked: the check ran out of its {budget:g} s",
                                        "run `tether doctor` again"))
                continue
            try:
                ns = os.readlink(f"{proc}/{c.pid}/ns/mnt")
                with open(f"{proc}/{c.pid}/mountinfo") as f:
                    mounts = mounts_of(f.read())
            except OSError:
                findings.append(Finding(c.name, c.id, GONE, f"its process {c.pid} is gone"))
                continue
            if ns == host_ns:
                findings.append(Finding(c.name, c.id, GONE, f"process {c.pid} is in the host's mount namespace: "
                                        "not the container's process (it is gone)"))
                continue
            mine = ours(mounts)
            found = look(c, mounts, mine) if mine else classify(c, mounts, {}, {}, fs, fs_device)
            for _ in range(RETRIES):  # a publish between the two reads looks like a stale file
                if found.state != STALE or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
                found = look(c, mounts, mine)
            findings.append(found)
    finally:
        reader.close()
    return findings
