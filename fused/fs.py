"""The served files: a read-only FUSE filesystem over published snapshots.

    <run_dir>/fs/<name>/{hosts,ports,env,resolv.conf}

It speaks the kernel's FUSE protocol on /dev/fuse directly (linux/fuse.h), on
a thread of its own, and reaches into nothing but the `Snapshot` it was last
given (never the store, never the kernel wiring): it can later move into a
process of its own.

Every open pins the file's bytes as of that moment: a reader sees one complete
snapshot from its open to its close however many changes happen meanwhile,
and the first open after a change sees the change. With FUSE passthrough
(Linux 6.9+) each version of a file is an immutable memfd registered as a
backing file, and reads, `sendfile` and `splice` go straight to it: the
daemon answers one OPEN per open and never a READ. Without passthrough, reads
come to us with the pinned bytes and direct I/O.

Why not the page cache (tmpfs speed with FUSE no-open): a file that changes in
place keeps its size in the inode's attributes and its bytes in its pages,
fetched by two requests; a change between them hands a reader the old size
with the new bytes (a truncated line, or trailing NULs). The test that reads
/etc/hosts during 500 retargets caught exactly that.

Why not pyfuse3: its `read()` gets no inode, it cannot answer an OPEN with a
backing file, and a plain thread of our own is what a separate FUSE process
needs anyway.

Inodes: root is 1; the directory of the k-th name ever looked up is 16k and its
files are 16k+1..16k+4. A name keeps its number while the kernel knows it.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import threading
import time

from .model import is_label
from .render import FILES, Snapshot, changed_files

log = logging.getLogger("tether.fs")

ROOT = 1
STRIDE = 16
TIMEOUT = 3600  # s: entries and attributes are invalidated explicitly on change

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT = 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS = 27, 28, 29, 34
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
NOTIFY_INVAL_INODE = 2

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # + attr
ATTR_OUT = struct.Struct("<QII")  # + attr
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (rest ignored)
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # 80 bytes
DIRENT = struct.Struct("<QQII")
NOTIFY_INVAL = struct.Struct("<Qqq")
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
DIRECT_IO, NOFLUSH, PASSTHROUGH_OPEN = 1 << 0, 1 << 5, 1 << 7
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 5  # in flags2 (FUSE_PASSTHROUGH is bit 37)
BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
BACKING_MAP = struct.Struct("<iIQ")
U64 = struct.Struct("<Q")

PROTO_MINOR = 40
MAX_WRITE = 1 << 17
BUFSIZE = MAX_WRITE + 4096
ASYNC_READ, PARALLEL_DIROPS, MAX_PAGES = 1 << 0, 1 << 18, 1 << 22

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class TetherFS:
    """Snapshot serving, inode table and the FUSE request loop."""

    def __init__(self, passthrough: bool = True) -> None:
        self.allow_passthrough = passthrough
        self._start_ns = time.time_ns()
        self.snapshot = Snapshot(mtime_ns=self._start_ns)
        self._mtimes: dict[tuple[str, str], int] = {}
        self._k_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._next_k = 1
        self._nlookup: dict[int, int] = {}
        self._open: dict[int, bytes] = {}  # file handle -> the bytes it pinned
        self._next_fh = 1
        self.passthrough = False
        self._backing: dict[int, tuple[bytes, int]] = {}  # ino -> (bytes, backing id)
        self._table = threading.Lock()  # inode table: FUSE thread vs publish()
        self.fd: int | None = None
        self.mountpoint: str | None = None
        self._thread: threading.Thread | None = None
        self.invalidations = 0

    # --- publishing (the service's thread) ------------------------------------
    def publish(self, snap: Snapshot) -> int:
        """Serve `snap` from now on; invalidate the kernel's copies of exactly
        the files whose bytes changed. Returns how many changed."""
        with self._table:
            old, self.snapshot = self.snapshot, snap
            changed = changed_files(old, snap, list(self._k_of))
            inos = []
            for name, f in changed:
                self._mtimes[(name, f)] = snap.mtime_ns
                ino = self._k_of[name] * STRIDE + 1 + FILES.index(f)
                if self._nlookup.get(ino):
                    inos.append(ino)
        # attributes only (the size `stat` shows): reads never use the page cache
        for ino in inos:
            self._notify_inval(ino)
        return len(changed)

    def _notify_inval(self, ino: int) -> None:
        if self.fd is None:
            return
        body = NOTIFY_INVAL.pack(ino, -1, 0)  # off -1: attributes only
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), NOTIFY_INVAL_INODE, 0) + body)
            self.invalidations += 1
        except OSError as e:  # ENOENT: the kernel has forgotten the inode
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    # --- inode table ------------------------------------------------------------
    def _dir_ino(self, name: str) -> int:
        k = self._k_of.get(name)
        if k is None:
            k = self._next_k
            self._next_k += 1
            self._k_of[name] = k
            self._name_of[k] = name
        return k * STRIDE

    def _decode(self, ino: int) -> tuple[str | None, str | None]:
        """(name, file) of an inode; (None, None) for the root."""
        if ino == ROOT:
            return None, None
        k, i = divmod(ino, STRIDE)
        name = self._name_of.get(k)
        if name is None or i > len(FILES):
            raise OSError(errno.ENOENT, "no such inode")
        return name, (FILES[i - 1] if i else None)

    def _data(self, name: str, f: str) -> bytes:
        snap = self.snapshot
        return snap.files.get(name, snap.default).get(f)

    def _attr(self, ino: int) -> bytes:
        name, f = self._decode(ino)
        mtime = self._start_ns
        if f is None:
            mode, nlink, size = stat.S_IFDIR | 0o555, 2, 0
        else:
            mode, nlink, size = stat.S_IFREG | 0o444, 1, len(self._data(name, f))
            mtime = self._mtimes.get((name, f), mtime)
        sec, nsec = divmod(mtime, 1_000_000_000)
        return ATTR.pack(ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, mode, nlink, 0, 0, 0, 4096, 0)

    def _entry(self, ino: int) -> bytes:
        attr = self._attr(ino)
        self._nlookup[ino] = self._nlookup.get(ino, 0) + 1
        return ENTRY_OUT.pack(ino, 0, TIMEOUT, TIMEOUT, 0, 0) + attr

    def _forget(self, ino: int, n: int) -> None:
        left = self._nlookup.get(ino, 0) - n
        if left > 0:
            self._nlookup[ino] = left
            return
        self._nlookup.pop(ino, None)
        backing = self._backing.pop(ino, None)
        if backing is not None:
            self._close_backing(backing[1])
        k = ino // STRIDE
        name = self._name_of.get(k)
        # a name the kernel no longer knows (dir nor files), and not registered:
        # its number can go
        if ino != ROOT and name is not None and name not in self.snapshot.files:
            if not any(self._nlookup.get(k * STRIDE + i) for i in range(len(FILES) + 1)):
                del self._name_of[k], self._k_of[name]
                for f in FILES:
                    self._mtimes.pop((name, f), None)

    # --- requests ----------------------------------------------------------------
    def handle(self, opcode: int, nodeid: int, body: bytes) -> bytes | None:
        """The reply body for one request; None: no reply; OSError: an error reply."""
        if opcode == OPEN:
            (flags,) = struct.unpack_from("<I", body)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise OSError(errno.EROFS, "")
            name, f = self._decode(nodeid)
            if f is None:
                raise OSError(errno.EISDIR, "")
            data = self._data(name, f)
            if self.passthrough:
                return OPEN_OUT.pack(0, PASSTHROUGH_OPEN | NOFLUSH, self._backing_id(nodeid, data))
            with self._table:
                fh = self._next_fh
                self._next_fh += 1
                self._open[fh] = data
            return OPEN_OUT.pack(fh, DIRECT_IO | NOFLUSH, 0)
        if opcode == RELEASE:
            (fh,) = U64.unpack_from(body)
            self._open.pop(fh, None)
            return b""
        if opcode == READ:
            fh, off, size, _ = READ_IN.unpack_from(body)
            data = self._open.get(fh)
            if data is None:
                name, f = self._decode(nodeid)
                if f is None:
                    raise OSError(errno.EISDIR, "")
                data = self._data(name, f)
            return data[off : off + size]
        if opcode == LOOKUP:
            return self._lookup(nodeid, body[: body.index(b"\0")] if b"\0" in body else body)
        if opcode == GETATTR:
            return ATTR_OUT.pack(TIMEOUT, 0, 0) + self._attr(nodeid)
        if opcode == FORGET:
            with self._table:
                self._forget(nodeid, U64.unpack_from(body)[0])
            return None
        if opcode == BATCH_FORGET:
            (count,) = struct.unpack_from("<I", body)
            with self._table:
                for i in range(count):
                    ino, n = struct.unpack_from("<QQ", body, 8 + 16 * i)
                    self._forget(ino, n)
            return None
        if opcode == READDIR:
            _fh, off, size, _ = READ_IN.unpack_from(body)
            return self._readdir(nodeid, off, size)
        if opcode == STATFS:
            files = len(self._name_of) * (len(FILES) + 1) + 1
            return STATFS_OUT.pack(0, 0, 0, files, 0, 4096, 63, 4096, 0)
        if opcode == ACCESS:
            (mask,) = struct.unpack_from("<I", body)
            self._decode(nodeid)
            if mask & os.W_OK:
                raise OSError(errno.EROFS, "")
            return b""
        if opcode in (INTERRUPT,):
            return None
        if opcode in (RELEASEDIR, DESTROY):
            return b""
        if opcode in (SETATTR,):
            raise OSError(errno.EROFS, "")
        # OPENDIR, FLUSH, GETXATTR, LISTXATTR, and everything else: ENOSYS,
        # which the kernel remembers (no-opendir, no-flush, no-xattr...)
        raise OSError(errno.ENOSYS, "")

    def _backing_id(self, ino: int, data: bytes) -> int:
        """The backing file holding `data` for `ino`: a new immutable memfd per
        version. The previous version's id is closed; files open on it keep
        it alive in the kernel until they close."""
        cur = self._backing.get(ino)
        if cur is not None and cur[0] is data:
            return cur[1]
        mfd = os.memfd_create("tether", os.MFD_CLOEXEC)
        try:
            os.write(mfd, data)
            buf = ctypes.create_string_buffer(BACKING_MAP.pack(mfd, 0, 0))
            bid = _libc.ioctl(self.fd, BACKING_OPEN, buf)
            if bid < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"FUSE backing file: {os.strerror(err)}")
        finally:
            os.close(mfd)
        if cur is not None:
            self._close_backing(cur[1])
        self._backing[ino] = (data, bid)
        return bid

    def _close_backing(self, bid: int) -> None:
        _libc.ioctl(self.fd, BACKING_CLOSE, ctypes.byref(ctypes.c_uint32(bid)))

    def _lookup(self, parent: int, raw: bytes) -> bytes:
        try:
            s = raw.decode("ascii")
        except UnicodeDecodeError:
            raise OSError(errno.ENOENT, "") from None
        with self._table:
            pname, pf = self._decode(parent)
            if pf is not None:
                raise OSError(errno.ENOTDIR, "")
            if parent == ROOT:
                if not is_label(s):
                    raise OSError(errno.ENOENT, "")
                return self._entry(self._dir_ino(s))
            if s not in FILES:
                raise OSError(errno.ENOENT, "")
            return self._entry(parent + 1 + FILES.index(s))

    def _readdir(self, nodeid: int, off: int, size: int) -> bytes:
        with self._table:
            name, f = self._decode(nodeid)
            if f is not None:
                raise OSError(errno.ENOTDIR, "")
            entries = [(".", nodeid, stat.S_IFDIR), ("..", ROOT, stat.S_IFDIR)]
            if name is None:
                entries += [(n, self._dir_ino(n), stat.S_IFDIR) for n in sorted(self.snapshot.files)]
            else:
                entries += [(fn, nodeid + 1 + i, stat.S_IFREG) for i, fn in enumerate(FILES)]
        out = bytearray()
        for i, (n, ino, mode) in enumerate(entries[off:], off):
            nb = n.encode()
            rec = DIRENT.pack(ino, i + 1, len(nb), mode >> 12) + nb
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    # --- the loop ----------------------------------------------------------------
    def _init_reply(self, body: bytes) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
        if major != 7:
            raise OSError(errno.EPROTO, f"FUSE protocol {major} not supported")
        flags2 = struct.unpack_from("<I", body, INIT_IN.size)[0] if flags & INIT_EXT and len(body) > INIT_IN.size else 0
        want = flags & (ASYNC_READ | PARALLEL_DIROPS | MAX_PAGES | INIT_EXT)
        want2 = flags2 & PASSTHROUGH if self.allow_passthrough else 0
        self.passthrough = bool(want2)
        log.info("FUSE protocol 7.%d, passthrough %s", min(minor, PROTO_MINOR), "on" if self.passthrough else "off")
        return INIT_OUT.pack(7, min(minor, PROTO_MINOR), max_readahead, want, 16, 12, MAX_WRITE, 1, 32, 0, want2, 1 if want2 else 0)

    def serve(self) -> None:
        fd = self.fd
        assert fd is not None
        while True:
            try:
                req = os.read(fd, BUFSIZE)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # request was interrupted
                    continue
                if e.errno in (errno.ENODEV, errno.EBADF):  # unmounted
                    return
                raise
            if len(req) < IN_HEADER.size:
                continue
            _len, opcode, unique, nodeid, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(req)
            body = req[IN_HEADER.size :]
            try:
                reply = self._init_reply(body) if opcode == INIT else self.handle(opcode, nodeid, body)
                err = 0
            except OSError as e:
                reply, err = b"", -(e.errno or errno.EIO)
            except Exception:
                log.exception("FUSE request %d failed", opcode)
                reply, err = b"", -errno.EIO
            if reply is None:
                continue
            try:
                os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(reply), err, unique) + reply)
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if e.errno in (errno.ENODEV, errno.EBADF):
                    return
                raise

    def mount(self, mountpoint: str) -> None:
        os.makedirs(mountpoint, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read={MAX_WRITE}"
        rc = _libc.mount(b"tether", mountpoint.encode(), b"fuse.tether", MS_RDONLY | MS_NOSUID | MS_NODEV, opts.encode())
        if rc != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"cannot mount FUSE at {mountpoint}: {os.strerror(err)}")
        self.fd, self.mountpoint = fd, mountpoint
        self._thread = threading.Thread(target=self.serve, name="tether-fuse", daemon=True)
        self._thread.start()

    def unmount(self) -> None:
        if self.mountpoint is not None:
            _libc.umount2(self.mountpoint.encode(), MNT_DETACH)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.mountpoint = self._thread = None


def _is_mount_point(path: str) -> bool:
    """From /proc/self/mountinfo, never by stat(): a hung FUSE server would
    block a stat of its mount point forever."""
    want = os.path.realpath(os.path.dirname(path.rstrip("/")) or "/")
    want = os.path.join(want, os.path.basename(path.rstrip("/")))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == want:
                return True
    return False


def detach(path) -> bool:
    """Lazily unmount whatever is at `path` (e.g. a FUSE mount a crashed or
    hung daemon left)."""
    path = str(path)
    if not _is_mount_point(path):
        return False
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        log.warning("cannot unmount %s: %s", path, os.strerror(ctypes.get_errno()))
        return False
    log.info("unmounted a stale mount at %s", path)
    return True
