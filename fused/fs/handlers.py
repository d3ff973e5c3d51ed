"""The served filesystem over a published snapshot: request in, reply out.

    /<name>/{hosts,ports,env,resolv.conf}      read-only, any valid name

No I/O here but through two small seams: `Backing` registers an immutable
copy of some bytes as a passthrough backing file (an ioctl on /dev/fuse in
the file server, a dict in the unit tests), and `OpenTable` remembers which
backing file each inode has open in the kernel, in memory that outlives the
process (so a file server that replaces a dead one knows it too).

Inode numbers are derived from the name (a 48-bit BLAKE2b of it, times 8,
plus the file's index): a server that starts after another one died answers
for inodes it never handed out, and agrees with the kernel about them.

Every open pins the file's bytes as of that moment, so a reader sees one whole
snapshot from open to close. With passthrough (Linux 6.9+) the pinned bytes
are a memfd registered as a backing file: reads never reach us. The kernel
allows one backing file per inode among the files open at a time, and fails
(EIO) an open that brings another, passthrough or direct I/O alike; so while
a reader holds an older version open, a new open reads that same version
(whole, one change behind) and the first open after the last close gets the
current bytes. A backing file is closed only when no open file uses it and no
OPEN reply naming it can still be on its way (its count covers both).
Without passthrough, every open gets direct I/O from a copy we pin per handle.
"""
from __future__ import annotations

import errno
import hashlib
import random
import re
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from . import wire

FILES = ("hosts", "ports", "env", "resolv.conf")
ROOT = 1
STRIDE = 8  # inode = key * STRIDE + (0: the directory, 1..4: its files)
KEY_BITS = 48
TIMEOUT = 3600  # s: the kernel keeps entries and attributes until we invalidate them

_LABEL = re.compile(rb"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_FILE_INDEX = {f.encode(): i for i, f in enumerate(FILES)}
EMPTY = (b"", b"", b"", b"")

# one struct per reply shape on the hot path: header and body in one pack
_OPEN_REPLY = struct.Struct("<IiQQIi")  # out header + fuse_open_out
_HEAD_OPEN = struct.Struct("<IIQQ16xI")  # len opcode unique nodeid (uid gid pid ext pad) open_in.flags
_HEAD_RELEASE = struct.Struct("<IIQQ16xQ")  # ... release_in.fh
_UNIQUE_MASK = ~wire.UNIQUE_RESEND & ((1 << 64) - 1)
_COUNT = struct.Struct("<iQ").pack_into  # OpenTable.COUNT
_HEADER = wire.OUT_HEADER
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_PT_FLAGS = wire.PASSTHROUGH_OPEN | wire.NOFLUSH
_KEY_END = 1 << KEY_BITS
_ATTR_REPLY = struct.Struct("<IiQ" + "QII" + wire.ATTR.format[1:])
_ENTRY_REPLY = struct.Struct("<IiQ" + "QQQQII" + wire.ATTR.format[1:])


def key(name: str) -> int:
    """The inode key of a name: stable across processes and versions."""
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "little")
    return h % ((1 << KEY_BITS) - 1) + 1  # never 0: key 0 holds the root


def ino(name: str, f: str | None = None) -> int:
    return key(name) * STRIDE + (0 if f is None else 1 + FILES.index(f))


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


class Snapshot(NamedTuple):
    """What the file server serves: immutable, replaced whole."""

    files: dict[str, tuple[bytes, bytes, bytes, bytes]]  # name -> bytes in FILES order
    default: tuple[bytes, bytes, bytes, bytes]  # any other valid name
    mtime_ns: int
    by_key: dict[int, str]  # key(name) -> name, for every name in `files`


def snapshot(files: dict, default=EMPTY, mtime_ns: int = 0) -> Snapshot:
    return Snapshot(files, default, mtime_ns, {key(n): n for n in files})


class Backing(Protocol):
    def open(self, data: bytes) -> int: ...  # a backing id for an immutable copy of data
    def close(self, bid: int) -> None: ...


@dataclass(slots=True)
class Slot:
    bid: int  # backing id (0: none)
    count: int  # open files using it, plus OPEN replies on their way
    token: bytes  # digest of the bytes it holds
    last: int  # unique of the last OPEN or RELEASE counted (a resent one is not counted twice)
    off: int = field(default=-1, compare=False)  # its record in the table's memory (-1: none)
    data: object = field(default=None, compare=False)  # the very bytes object it holds, in this process


class OpenTable:
    """inode -> Slot, written through to `mem` (32-byte records) so that the
    next file server can load it and agree with the kernel about which
    backing file each inode has open. A count and the request that changed
    it are written together: a server killed before its reply leaves a count
    that the resent request (same unique) does not change again."""

    REC = struct.Struct("<QiiQ8s")  # ino bid count last token
    COUNT = struct.Struct("<iQ")  # count last, at offset 12 (also _COUNT)

    def __init__(self, mem) -> None:
        self.mem = mem
        self.slots: dict[int, Slot] = {}
        self._free: list[int] = []
        self.full = False
        rec = self.REC
        for off in range(len(mem) - len(mem) % rec.size - rec.size, -1, -rec.size):
            i, bid, count, last, token = rec.unpack_from(mem, off)
            if i:
                self.slots[i] = Slot(bid, count, token, last, off)
            else:
                self._free.append(off)

    def get(self, i: int) -> Slot | None:
        return self.slots.get(i)

    def put(self, i: int, slot: Slot) -> None:
        old = self.slots.get(i)
        slot.off = old.off if old is not None else -1
        self.slots[i] = slot
        if slot.off < 0:
            if not self._free:
                self.full = True  # keep serving; only a restart would forget this one
                return
            slot.off = self._free.pop()
        self.REC.pack_into(self.mem, slot.off, i, slot.bid, slot.count, slot.last, slot.token)

    def count(self, i: int, delta: int, unique: int, once: bool = True) -> Slot:
        """Add `delta` to the open count of `i` for request `unique`, once."""
        s = self.slots[i]
        unique &= ~wire.UNIQUE_RESEND
        if once and unique == s.last:
            return s  # counted before the server that read it first died
        s.count = max(0, s.count + delta)
        s.last = unique
        if s.off >= 0:
            self.COUNT.pack_into(self.mem, s.off + 12, s.count, unique)
        return s

    def drop(self, i: int) -> None:
        s = self.slots.pop(i, None)
        if s is not None and s.off >= 0:
            struct.pack_into("<Q", self.mem, s.off, 0)
            self._free.append(s.off)


class Handlers:
    """One FUSE connection's requests, answered from `self.snap`.

    `handle(buf, n)` takes what one read() of /dev/fuse returned and gives the
    bytes to write back (None: no reply). Only the thread that calls
    `handle` touches the table; `publish` (another thread) only swaps the
    snapshot reference and says which inodes to invalidate."""

    def __init__(self, backing: Backing | None, table: OpenTable, snap: Snapshot | None = None) -> None:
        self.backing = backing
        self.passthrough = backing is not None
        self.table = table
        self.snap = snap or snapshot({}, mtime_ns=time.time_ns())
        self._start_ns = self.snap.mtime_ns
        self._mtime: dict[int, int] = {}
        self._direct: dict[int, tuple[int, bytes]] = {}  # fh -> (inode, pinned bytes): direct I/O opens
        # handles of a server before us may still be open: ours start elsewhere
        self._next_fh = random.getrandbits(62) << 1 | 1
        self._unlisted: set[int] = set()  # keys of names looked up but not in the snapshot
        self._opening = 0  # the inode of the OPEN whose reply is being written
        self.init: wire.Init | None = None
        self.on_init = lambda init: None
        self.allow_passthrough = backing is not None
        self.dispatch = {
            wire.OPEN: self.open,
            wire.RELEASE: self.release,
            wire.GETATTR: self.getattr,
            wire.LOOKUP: self.lookup,
            wire.READ: self.read,
            wire.FORGET: self.forget,
            wire.BATCH_FORGET: self.batch_forget,
            wire.READDIR: self.readdir,
            wire.STATFS: self.statfs,
            wire.ACCESS: self.access,
            wire.INIT: self.init_,
            wire.INTERRUPT: _no_reply,
            wire.RELEASEDIR: _empty,
            wire.DESTROY: _empty,
        }
        for op in (wire.SETATTR, wire.MKNOD, wire.MKDIR, wire.UNLINK, wire.RMDIR, wire.RENAME, wire.LINK,
                   wire.SYMLINK, wire.WRITE, wire.CREATE, wire.SETXATTR, wire.REMOVEXATTR):
            self.dispatch[op] = _read_only

    # --- publishing ------------------------------------------------------------
    def publish(self, snap: Snapshot) -> list[int]:
        """Serve `snap` from now on; returns the inodes whose bytes changed (the
        caller invalidates the kernel's attributes of those)."""
        old, self.snap = self.snap, snap
        changed = []
        if old.default != snap.default:  # names served the default that the kernel knows
            for k in self._unlisted - snap.by_key.keys():
                base = k * STRIDE + 1
                changed += [base + i for i in range(len(FILES)) if old.default[i] != snap.default[i]]
        for name in old.files.keys() | snap.files.keys():
            a = old.files.get(name, old.default)
            b = snap.files.get(name, snap.default)
            if a is b:
                continue
            base = key(name) * STRIDE + 1
            for i in range(len(FILES)):
                if a[i] != b[i]:
                    changed.append(base + i)
                    self._mtime[base + i] = snap.mtime_ns
        return changed

    # --- the loop's entry -------------------------------------------------------
    def handle(self, buf, n: int | None = None) -> bytes | None:
        if n is None:
            n = len(buf)
        # The two requests every read of a file brings, inline: one unpack of
        # header and field, the slot updated in place. Anything unusual takes
        # the general path below, which answers the same.
        op = buf[4] if n > 4 else 0  # the opcode's low byte, checked in full below
        if op == 14 and n == 48 and self.passthrough:  # OPEN
            length, opcode, unique, i, flags = _HEAD_OPEN.unpack_from(buf)
            if opcode == wire.OPEN and not flags & 0o3003:
                k, idx = i >> 3, i & 7
                if 0 < idx <= 4 and 0 < k < _KEY_END:
                    snap = self.snap
                    name = snap.by_key.get(k)
                    data = (snap.default if name is None else snap.files[name])[idx - 1]
                    slot = self.table.slots.get(i)
                    if slot is None or (slot.count == 0 and slot.data is not data):
                        return _OPEN_REPLY.pack(32, 0, unique, 0, _PT_FLAGS, self._pin(i, data, unique))
                    u = unique & _UNIQUE_MASK
                    if u != slot.last:  # (a resent request was counted by the server before us)
                        slot.count += 1
                        slot.last = u
                        if slot.off >= 0:
                            _COUNT(self.table.mem, slot.off + 12, slot.count, u)
                    self._opening = i
                    return _OPEN_REPLY.pack(32, 0, unique, 0, _PT_FLAGS, slot.bid)
        elif op == 18 and n >= 56 and self.passthrough:  # RELEASE
            length, opcode, unique, i, fh = _HEAD_RELEASE.unpack_from(buf)
            if length == n and opcode == wire.RELEASE and not fh:
                slot = self.table.slots.get(i)
                if slot is not None:
                    u = unique & _UNIQUE_MASK
                    if u != slot.last:
                        if slot.count > 0:
                            slot.count -= 1
                        slot.last = u
                        if slot.off >= 0:
                            _COUNT(self.table.mem, slot.off + 12, slot.count, u)
                return _HEADER.pack(16, 0, unique)
        req = wire.parse(buf, n)
        fn = self.dispatch.get(req.opcode)
        if fn is None:  # OPENDIR, FLUSH, GETXATTR, ...: ENOSYS, which the kernel remembers
            return wire.error(req.unique, errno.ENOSYS)
        try:
            return fn(req)
        except OSError as e:
            return wire.error(req.unique, e.errno or errno.EIO)
        except (struct.error, IndexError, wire.Malformed):
            return wire.error(req.unique, errno.EINVAL)

    # --- inodes -------------------------------------------------------------------
    def _decode(self, i: int) -> tuple[int, int]:
        """(key, index): index 0 is a name's directory, 1..4 its files; key 0 the root."""
        if i == ROOT:
            return 0, 0
        k, idx = divmod(i, STRIDE)
        if k == 0 or idx > len(FILES) or k >= 1 << KEY_BITS:
            raise OSError(errno.ENOENT, "no such inode")
        return k, idx

    def _data(self, k: int, idx: int) -> bytes:
        snap = self.snap
        name = snap.by_key.get(k)
        return (snap.default if name is None else snap.files[name])[idx - 1]

    def _attr(self, i: int, k: int, idx: int) -> tuple:
        if k == 0 or idx == 0:
            sec, nsec = divmod(self._start_ns, 1_000_000_000)
            return (i, 0, 0, sec, sec, sec, nsec, nsec, nsec, stat.S_IFDIR | 0o555, 2, 0, 0, 0, 4096, 0)
        size = len(self._data(k, idx))
        sec, nsec = divmod(self._mtime.get(i, self._start_ns), 1_000_000_000)
        return (i, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, stat.S_IFREG | 0o444, 1, 0, 0, 0, 4096, 0)

    # --- requests ------------------------------------------------------------------
    def init_(self, req: wire.Request) -> bytes:
        self.init = wire.init(req.body, self.allow_passthrough)
        self.passthrough = self.init.passthrough
        self.on_init(self.init)
        return wire.reply(req.unique, self.init.reply)

    def lookup(self, req: wire.Request) -> bytes:
        k, idx = self._decode(req.nodeid)
        name = wire.cstring(req.body)
        if idx:
            raise OSError(errno.ENOTDIR, "")
        if k == 0:
            if _LABEL.fullmatch(name) is None:
                raise OSError(errno.ENOENT, "")
            ck = key(name.decode())
            if ck not in self.snap.by_key:
                self._unlisted.add(ck)
            child = ck * STRIDE
        else:
            fi = _FILE_INDEX.get(name)
            if fi is None:
                raise OSError(errno.ENOENT, "")
            child = req.nodeid + 1 + fi
        ck, cidx = divmod(child, STRIDE)
        return _ENTRY_REPLY.pack(_ENTRY_REPLY.size, 0, req.unique, child, 0, TIMEOUT, TIMEOUT, 0, 0, *self._attr(child, ck, cidx))

    def getattr(self, req: wire.Request) -> bytes:
        k, idx = self._decode(req.nodeid)
        return _ATTR_REPLY.pack(_ATTR_REPLY.size, 0, req.unique, TIMEOUT, 0, 0, *self._attr(req.nodeid, k, idx))

    def open(self, req: wire.Request) -> bytes:
        (flags,) = struct.unpack_from("<I", req.body)
        if flags & 0o3003:  # O_WRONLY, O_RDWR, O_TRUNC, O_APPEND
            raise OSError(errno.EROFS, "")
        i = req.nodeid
        k, idx = self._decode(i)
        if idx == 0:
            raise OSError(errno.EISDIR, "")
        data = self._data(k, idx)
        if self.passthrough:
            bid = self._pin(i, data, req.unique)
            return _OPEN_REPLY.pack(32, 0, req.unique, 0, wire.PASSTHROUGH_OPEN | wire.NOFLUSH, bid)
        fh = self._next_fh
        self._next_fh += 2
        self._direct[fh] = (i, data)
        return _OPEN_REPLY.pack(32, 0, req.unique, fh, wire.DIRECT_IO | wire.NOFLUSH, 0)

    def _pin(self, i: int, data: bytes, unique: int) -> int:
        """The backing id this open reads, counted as open from now on.

        The kernel lets an inode have one backing file among its open files,
        and fails (EIO) any open that brings another one, passthrough or not.
        So while the inode is open, a new open reads the version those opens
        pinned (whole, possibly one change behind); the first open after the
        last close gets the current bytes."""
        table = self.table
        slot = table.slots.get(i)
        if slot is None or slot.count == 0 and slot.data is not data:
            token = digest(data)
            if slot is None or slot.token != token or not slot.bid:
                bid = self.backing.open(data)
                if slot is not None and slot.bid:
                    self.backing.close(slot.bid)  # count 0: no open file, no reply on its way
                slot = Slot(bid, 0, token, slot.last if slot else 0)
                table.put(i, slot)
            slot.data = data
        self._opening = i
        return table.count(i, +1, unique).bid

    def release(self, req: wire.Request) -> bytes:
        fh, _flags, _rflags = wire.RELEASE_IN.unpack_from(req.body)
        if fh:
            self._direct.pop(fh, None)
        elif req.nodeid in self.table.slots:
            # the kernel let go of the backing file at the last close, before
            # it sent this: the count may drop before we answer
            self.table.count(req.nodeid, -1, req.unique)
        return wire.reply(req.unique)

    def unanswered(self) -> None:
        """The kernel refused the reply just written (the request was gone):
        an OPEN counted for it will never be released."""
        i, self._opening = self._opening, 0
        if i and i in self.table.slots:
            self.table.count(i, -1, 0, once=False)

    def written(self) -> None:
        self._opening = 0

    def read(self, req: wire.Request) -> bytes:
        fh, off, size, _ = wire.READ_IN.unpack_from(req.body)
        pinned = self._direct.get(fh)
        data = pinned[1] if pinned is not None and pinned[0] == req.nodeid else None
        if data is None:  # opened by a server before us
            k, idx = self._decode(req.nodeid)
            if idx == 0:
                raise OSError(errno.EISDIR, "")
            data = self._data(k, idx)
        return wire.reply(req.unique, data[off : off + size])

    def forget(self, req: wire.Request) -> None:
        self._forgotten(req.nodeid)
        return None

    def batch_forget(self, req: wire.Request) -> None:
        count, _ = wire.BATCH_FORGET_IN.unpack_from(req.body)
        for n in range(count):
            i, _nlookup = wire.FORGET_ONE.unpack_from(req.body, wire.BATCH_FORGET_IN.size + n * wire.FORGET_ONE.size)
            self._forgotten(i)
        return None

    def _forgotten(self, i: int) -> None:
        """The kernel dropped the inode: nothing has it open, its backing file can go."""
        if i % STRIDE == 0:
            self._unlisted.discard(i // STRIDE)
        slot = self.table.get(i)
        if slot is not None and slot.count == 0:
            if slot.bid and self.backing is not None:
                self.backing.close(slot.bid)
            self.table.drop(i)

    def readdir(self, req: wire.Request) -> bytes:
        _fh, off, size, _ = wire.READ_IN.unpack_from(req.body)
        k, idx = self._decode(req.nodeid)
        if idx:
            raise OSError(errno.ENOTDIR, "")
        d, r = stat.S_IFDIR >> 12, stat.S_IFREG >> 12
        entries = [(b".", req.nodeid, d), (b"..", ROOT, d)]
        if k == 0:
            entries += [(n.encode(), key(n) * STRIDE, d) for n in sorted(self.snap.files)]
        else:
            entries += [(f.encode(), req.nodeid + 1 + n, r) for n, f in enumerate(FILES)]
        out = bytearray()
        for n, (name, child, kind) in enumerate(entries[off:], off):
            rec = wire.dirent(child, n + 1, name, kind)
            if len(out) + len(rec) > size:
                break
            out += rec
        return wire.reply(req.unique, bytes(out))

    def statfs(self, req: wire.Request) -> bytes:
        files = len(self.snap.files) * (len(FILES) + 1) + 1
        return wire.reply(req.unique, wire.STATFS_OUT.pack(0, 0, 0, files, 0, 4096, 63, 4096, 0))

    def access(self, req: wire.Request) -> bytes:
        (mask, _) = wire.ACCESS_IN.unpack_from(req.body)
        self._decode(req.nodeid)
        if mask & 2:  # W_OK
            raise OSError(errno.EROFS, "")
        return wire.reply(req.unique)


def _no_reply(req: wire.Request) -> None:
    return None


def _empty(req: wire.Request) -> bytes:
    return wire.reply(req.unique)


def _read_only(req: wire.Request) -> bytes:
    return wire.error(req.unique, errno.EROFS)
