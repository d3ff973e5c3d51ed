"""The served filesystem over a published snapshot: request in, reply out.

    /<name>/{hosts,ports,env,resolv.conf}      read-only, any valid name

No I/O here but through two small seams: `Backing` closes the backing files
an older file server registered (passthrough, below), and `OpenTable`
remembers which of those each inode still has open, in memory that outlives
the process.

Inode numbers are derived from the name (a 48-bit BLAKE2b of it, times 8,
plus the file's index): a server that starts after another one died answers
for inodes it never handed out, and agrees with the kernel about them.

Every open reads through us (direct I/O) from the bytes its handle pinned:
a read at offset 0 pins the current version, and the reads after it go on in
that version. One pass over a file is one whole version, however long the
file is held open, and the next pass reads the current one: a new open, a
rewind (`tail -f` after the file shrank), or a reader that keeps reading at
the end (`tail -f` after it grew). `fstat` gives the current size.

sendfile, splice and mmap of a direct I/O file still go through the page
cache on this kernel (fuse_splice_read: filemap_splice_read), which READs
without FUSE_READ_LOCKOWNER fill and which the kernel cuts at the size it
knows: bytes of another length would come out cut short or padded with NULs.
Those READs get the version whose size the kernel was last told for that
inode (in a LOOKUP or GETATTR reply). A publish invalidates the attributes
of what changed, on the FUSE thread while no request is waiting (server.py):
an attribute reply the kernel asked for before an invalidation is one it
drops, so none may be in flight. Every open asks for the attributes again
after that (the mount's default_permissions) and drops the cached pages;
so does the kernel when the attributes bring another size.

A file that gets shorter is the exception. Told a smaller size, the kernel
zeroes the cached page beyond it in place, and a page that sendfile put in
a pipe is that same page: a reader that had read the old version whole
would find it cut or padded with NULs. So the kernel learns a smaller size
from a READ instead, which fills a page with the new bytes and comes back
short (fuse_read_update_size: no truncation): until then the attributes
keep the old size, and the first page-cache READ of the file gets the new
bytes. The file server makes that READ itself (an open drops the cached
pages first) before the publish returns, then invalidates the attributes.

The size the kernel was told is known for sure only for an attribute
request begun after the invalidation: one the kernel had begun before it
(the task preempted between taking the attribute version and queueing the
request) gets its reply dropped. So after a publish, each changed file is
"settling": the file server stats it itself, and other tasks' attribute
requests wait until that reply went (page-cache READs wait only once that
reply is written, until the stat returns: before, the kernel has the old
size; during, it may be taking the new one, possibly waiting for the very
page a READ fills, which LATER_MAX then answers with the new bytes).

And sendfile takes the file's size after its READ came back: a reply that
changes the size in between (an attribute reply, or the READ that shrinks
it) would cut or pad what it copies, and a reader can be preempted right
there. Such a reply waits until the open files that filled pages of that
inode lately are closed (cat's RELEASE comes right after its sendfile),
LATER_MAX at most.

Why not passthrough (the kernel reading a memfd, no READ request at all):
the kernel gives an inode one backing file while any file of it is open,
and an open that brings another one or no passthrough fails with EIO
(fs/fuse/iomode.c); reads of a passthrough file go to its backing file for
as long as it is open. A reader holding the file open would then never see
a change, nor would anyone who opens it meanwhile, and `tail -f` spins on a
size that is not the bytes it reads. An older file server did use it: on
its connection an inode it left open with a backing file accepts only opens
that name that backing file, so those of ours do (FOPEN_PASSTHROUGH with
FOPEN_DIRECT_IO, which still sends every read to us), counted in the table,
and the backing file is closed at the last release.
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
FILL_GUARD = 0.05  # s: how long a page-cache READ holds back a change of its file's size (unless closed before)
LATER_MAX = 0.1  # s: the longest a reply waits for that (then it goes all the same)

_LABEL = re.compile(rb"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_FILE_INDEX = {f.encode(): i for i, f in enumerate(FILES)}
EMPTY = (b"", b"", b"", b"")

# one struct per reply shape on the hot path: header and body in one pack
_OPEN_REPLY = struct.Struct("<IiQQIi")  # out header + fuse_open_out
_HEAD_OPEN = struct.Struct("<IIQQ16xI")  # len opcode unique nodeid (uid gid pid ext pad) open_in.flags
_HEAD_RELEASE = struct.Struct("<IIQQ16xQ")  # ... release_in.fh
_HEAD_READ = struct.Struct("<IIQQ16xQQII")  # ... read_in.fh offset size read_flags
_HEADER = wire.OUT_HEADER
_DIO_FLAGS = wire.DIRECT_IO | wire.NOFLUSH
# an open of an inode an older server left open with a backing file: that
# backing file (the kernel's rule), reads still to us
_HELD_FLAGS = wire.PASSTHROUGH_OPEN | wire.DIRECT_IO | wire.NOFLUSH
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
    def close(self, bid: int) -> None: ...  # a backing id an older file server registered


@dataclass(slots=True)
class Slot:
    bid: int  # backing id (0: none)
    count: int  # open files using it, plus OPEN replies on their way
    token: bytes  # digest of the bytes it holds
    last: int  # unique of the last OPEN or RELEASE counted (a resent one is not counted twice)
    off: int = field(default=-1, compare=False)  # its record in the table's memory (-1: none)


@dataclass(slots=True)
class Handle:
    """One open file: the version it reads, and where a read found its end."""

    ino: int
    data: bytes
    eof: int = -1  # the offset of its last read, when that read returned nothing
    held: bool = False  # counted in the open table: it names an older server's backing file


class OpenTable:
    """inode -> Slot, written through to `mem` (32-byte records): which
    backing file each inode that an older file server opened with
    passthrough still has open, so that we agree with the kernel about it. A count and the request that changed
    it are written together: a server killed before its reply leaves a count
    that the resent request (same unique) does not change again."""

    REC = struct.Struct("<QiiQ8s")  # ino bid count last token
    COUNT = struct.Struct("<iQ")  # count last, at offset 12

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


class _Later(Exception):
    """The reply would change a size that a sendfile may be about to read:
    the request is answered later (Handlers.due)."""


class Handlers:
    """One FUSE connection's requests, answered from `self.snap`.

    `handle(buf, n)` takes what one read() of /dev/fuse returned and gives the
    bytes to write back (None: no reply). Only the thread that calls
    `handle` touches the handles and the table; `publish` (another thread)
    only swaps the snapshot reference and says which inodes to invalidate."""

    def __init__(self, backing: Backing | None, table: OpenTable, snap: Snapshot | None = None) -> None:
        self.backing = backing
        # the connection negotiated passthrough (an older server did): inodes
        # in the table may hold a backing file
        self.passthrough = False
        self.table = table
        self.snap = snap or snapshot({}, mtime_ns=time.time_ns())
        self._start_ns = self.snap.mtime_ns
        self._mtime: dict[int, int] = {}
        self.handles: dict[int, Handle] = {}  # fh -> what that open file reads
        self.told: dict[int, bytes] = {}  # inode -> the bytes whose size the kernel was last told
        self.shrinking: dict[int, bytes] = {}  # inode -> shorter bytes the kernel is to learn from a READ
        self.fillers: dict[int, dict[int, float]] = {}  # inode -> {fh: when it last filled pages}
        self.deferred: list[tuple[float, bytes]] = []  # (since, request) answered later
        self.settling: set[int] = set()  # published; the kernel's size not known for sure yet
        self.resizing: set[int] = set()  # settling, and a new size told the file server's stat
        self.clock = time.monotonic
        self._since = 0.0  # while a deferred request is handled again: when it first came
        self._force = False  # ...and it has waited LATER_MAX
        self.prober = 0  # the thread id that reads shrunk files to tell the kernel their size
        # handles of a server before us may still be open: ours start elsewhere
        self._next_fh = random.getrandbits(62) << 1 | 1
        self._unlisted: set[int] = set()  # keys of names looked up but not in the snapshot
        self._opening = 0  # the fh of the OPEN whose reply is being written
        self.init: wire.Init | None = None
        self.on_init = lambda init: None
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

    def defer_shrinks(self, changed: list[int]) -> list[int]:
        """Of the inodes `changed`, those whose bytes got shorter than what the
        kernel was told and that a path names (a registered name's file): the
        kernel is to learn their size from a READ (see above), not from an
        invalidation. Returns them; the caller invalidates the others."""
        out = []
        for i in changed:
            told = self.told.get(i)
            k, idx = divmod(i, STRIDE)
            if told is None or k not in self.snap.by_key or not 0 < idx <= len(FILES):
                continue
            new = self._data(k, idx)
            if len(new) < len(told):
                self.shrinking[i] = new
                out.append(i)
        return out

    def path(self, i: int) -> str | None:
        """`name/file` of a registered name's file inode."""
        k, idx = divmod(i, STRIDE)
        name = self.snap.by_key.get(k)
        return f"{name}/{FILES[idx - 1]}" if name is not None and 0 < idx <= len(FILES) else None

    # --- the loop's entry -------------------------------------------------------
    def handle(self, buf, n: int | None = None) -> bytes | None:
        if n is None:
            n = len(buf)
        # The three requests every read of a file brings, inline: one unpack
        # of header and fields. Anything unusual (and any inode an older
        # server left with a backing file) takes the general path below,
        # which answers the same.
        op = buf[4] if n > 4 else 0  # the opcode's low byte, checked in full below
        if op == 15 and n == 80:  # READ
            length, opcode, unique, i, fh, off, size, rflags = _HEAD_READ.unpack_from(buf)
            hd = self.handles.get(fh)
            if opcode == wire.READ and hd is not None and hd.ino == i and rflags & wire.READ_LOCKOWNER:
                data = hd.data
                if not off or off == hd.eof:  # a new pass: the current version
                    k, idx = i >> 3, i & 7
                    snap = self.snap
                    name = snap.by_key.get(k)
                    data = hd.data = (snap.default if name is None else snap.files[name])[idx - 1]
                chunk = data[off : off + size]
                hd.eof = -1 if chunk else off
                return _HEADER.pack(16 + len(chunk), 0, unique) + chunk
        elif op == 14 and n == 48 and not self.table.slots:  # OPEN
            length, opcode, unique, i, flags = _HEAD_OPEN.unpack_from(buf)
            if opcode == wire.OPEN and not flags & 0o3003:
                k, idx = i >> 3, i & 7
                if 0 < idx <= 4 and 0 < k < _KEY_END:
                    snap = self.snap
                    name = snap.by_key.get(k)
                    fh = self._next_fh
                    self._next_fh = fh + 2
                    self.handles[fh] = Handle(i, (snap.default if name is None else snap.files[name])[idx - 1])
                    self._opening = fh
                    return _OPEN_REPLY.pack(32, 0, unique, fh, _DIO_FLAGS, 0)
        elif op == 18 and n >= 56 and not self.table.slots:  # RELEASE
            length, opcode, unique, i, fh = _HEAD_RELEASE.unpack_from(buf)
            if length == n and opcode == wire.RELEASE:
                self.handles.pop(fh, None)
                if self.fillers:
                    self._unfill(i, fh)
                return _HEADER.pack(16, 0, unique)
        req = wire.parse(buf, n)
        fn = self.dispatch.get(req.opcode)
        if fn is None:  # OPENDIR, FLUSH, GETXATTR, ...: ENOSYS, which the kernel remembers
            return wire.error(req.unique, errno.ENOSYS)
        try:
            return fn(req)
        except _Later:
            self.deferred.append((self._since or self.clock(), bytes(memoryview(buf)[:n])))
            return None
        except OSError as e:
            return wire.error(req.unique, e.errno or errno.EIO)
        except (struct.error, IndexError, wire.Malformed):
            return wire.error(req.unique, errno.EINVAL)

    def attrs_deferred(self) -> bool:
        """Whether an attribute request is being held back: an invalidation
        written meanwhile would make the kernel drop its reply."""
        return any(raw[4] in (wire.GETATTR, wire.LOOKUP) for _, raw in self.deferred)

    def settled(self, inodes) -> None:
        """The file server's stat of these went (see above)."""
        self.settling.difference_update(inodes)
        self.resizing.difference_update(inodes)

    def due(self) -> list[bytes]:
        """The replies of deferred requests that may go now."""
        pending, self.deferred = self.deferred, []
        now = self.clock()
        out = []
        for since, raw in pending:
            self._since, self._force = since, now - since >= LATER_MAX
            try:
                r = self.handle(raw, len(raw))
            finally:
                self._since, self._force = 0.0, False
            if r is not None:
                out.append(r)
        return out

    # --- the size a sendfile may be reading -----------------------------------------
    def _filled(self, i: int, fh: int) -> None:
        self.fillers.setdefault(i, {})[fh] = self.clock()

    def _unfill(self, i: int, fh: int) -> None:
        f = self.fillers.get(i)
        if f is not None:
            f.pop(fh, None)
            if not f:
                del self.fillers[i]

    def _guarded(self, i: int, but: int | None = None) -> bool:
        """Whether an open file (other than `but`) filled pages of `i` lately."""
        f = self.fillers.get(i)
        if not f:
            return False
        now = self.clock()
        for fh, t in list(f.items()):
            if now - t >= FILL_GUARD:
                del f[fh]
        if not f:
            del self.fillers[i]
            return False
        return any(fh != but for fh in f)

    def _attrs_wait(self, i: int, pid: int) -> None:
        """Other tasks' attribute requests for `i` wait while it settles (see
        above), and while it waits for the READ that tells its smaller size:
        an attribute reply processed during that READ's flight would make the
        kernel ignore the size it brings (fuse_read_update_size compares
        attribute versions). The file server's own (the thread that stats and
        reads) do not. Not even LATER_MAX lets them go: the file server's
        requests come within it, or it gives up (server.py)."""
        if (i in self.shrinking or i in self.settling) and pid != self.prober:
            raise _Later()

    def _resize_waits(self, i: int, data: bytes) -> None:
        """Raise _Later when telling the kernel len(data) would change the size
        of `i` while a sendfile may be reading it."""
        told = self.told.get(i)
        if told is not None and len(told) != len(data) and not self._force and self._guarded(i):
            raise _Later()

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

    def _version(self, i: int, k: int, idx: int) -> bytes:
        """The bytes whose size the kernel knows for inode `i` (else the current ones)."""
        data = self.told.get(i)
        return self._data(k, idx) if data is None else data

    def _attr(self, i: int, k: int, idx: int) -> tuple:
        """The attributes of `i` to tell the kernel: a file's size is that of
        its current bytes, which the next pass of every handle reads."""
        if k == 0 or idx == 0:
            sec, nsec = divmod(self._start_ns, 1_000_000_000)
            return (i, 0, 0, sec, sec, sec, nsec, nsec, nsec, stat.S_IFDIR | 0o555, 2, 0, 0, 0, 4096, 0)
        data = self.told[i] if i in self.shrinking else self._data(k, idx)
        self._resize_waits(i, data)
        if i in self.settling and len(self.told.get(i, data)) != len(data):
            self.resizing.add(i)  # the kernel takes this size when the file server's stat returns
        self.told[i] = data
        size = len(data)
        sec, nsec = divmod(self._mtime.get(i, self._start_ns), 1_000_000_000)
        return (i, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, stat.S_IFREG | 0o444, 1, 0, 0, 0, 4096, 0)

    # --- requests ------------------------------------------------------------------
    def init_(self, req: wire.Request) -> bytes:
        self.init = wire.init(req.body)
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
        self._attrs_wait(child, req.pid)
        return _ENTRY_REPLY.pack(_ENTRY_REPLY.size, 0, req.unique, child, 0, TIMEOUT, TIMEOUT, 0, 0, *self._attr(child, ck, cidx))

    def getattr(self, req: wire.Request) -> bytes:
        k, idx = self._decode(req.nodeid)
        self._attrs_wait(req.nodeid, req.pid)
        return _ATTR_REPLY.pack(_ATTR_REPLY.size, 0, req.unique, TIMEOUT, 0, 0, *self._attr(req.nodeid, k, idx))

    def open(self, req: wire.Request) -> bytes:
        (flags,) = struct.unpack_from("<I", req.body)
        if flags & 0o3003:  # O_WRONLY, O_RDWR, O_TRUNC, O_APPEND
            raise OSError(errno.EROFS, "")
        i = req.nodeid
        k, idx = self._decode(i)
        if idx == 0:
            raise OSError(errno.EISDIR, "")
        hd = Handle(i, self._data(k, idx))
        fh = self._next_fh
        self._next_fh += 2
        open_flags, bid = _DIO_FLAGS, 0
        slot = self.table.slots.get(i)
        if slot is not None:
            if self.passthrough and slot.count > 0 and slot.bid:
                self.table.count(i, +1, req.unique)
                hd.held = True
                open_flags, bid = _HELD_FLAGS, slot.bid
            else:  # nothing has it open: the backing file can go
                self._close_slot(i)
        self.handles[fh] = hd
        self._opening = fh
        return _OPEN_REPLY.pack(32, 0, req.unique, fh, open_flags, bid)

    def release(self, req: wire.Request) -> bytes:
        fh, _flags, _rflags = wire.RELEASE_IN.unpack_from(req.body)
        hd = self.handles.pop(fh, None)
        i = req.nodeid
        # fh 0: a passthrough open of the older server's; or one of ours that named its backing file
        if self.fillers:
            self._unfill(i, fh)
        if (fh == 0 or (hd is not None and hd.held)) and i in self.table.slots:
            # the kernel let go of the backing file at the last close, before
            # it sent this: the count may drop before we answer
            if self.table.count(i, -1, req.unique).count == 0:
                self._close_slot(i)
        return wire.reply(req.unique)

    def _close_slot(self, i: int) -> None:
        slot = self.table.get(i)
        if slot is not None:
            if slot.bid and self.backing is not None:
                self.backing.close(slot.bid)
            self.table.drop(i)

    def unanswered(self) -> None:
        """The kernel refused the reply just written (the request was gone):
        an OPEN answered there will never be released."""
        fh, self._opening = self._opening, 0
        hd = self.handles.pop(fh, None) if fh else None
        if hd is not None and hd.held and hd.ino in self.table.slots:
            if self.table.count(hd.ino, -1, 0, once=False).count == 0:
                self._close_slot(hd.ino)

    def written(self) -> None:
        self._opening = 0

    def read(self, req: wire.Request) -> bytes:
        fh, off, size, rflags = wire.READ_IN.unpack_from(req.body)
        i = req.nodeid
        k, idx = self._decode(i)
        if idx == 0:
            raise OSError(errno.EISDIR, "")
        if not rflags & wire.READ_LOCKOWNER:  # filling the page cache: the size the kernel knows
            if i in self.resizing:
                # the new size is on its way into the kernel (the file server's
                # stat): wait until it is there; past LATER_MAX the kernel is
                # likely waiting for this very page to take it (a growth locks
                # the last page), so the size it takes is the new one
                if not self._force:
                    raise _Later()
                self.told[i] = self._data(k, idx)
            new = self.shrinking.get(i)
            if new is not None and not off and len(new) < size:  # short: the kernel takes its size
                if not self._force and self._guarded(i, but=fh):
                    raise _Later()
                del self.shrinking[i]
                self.told[i] = data = new
            else:
                data = self._version(i, k, idx)[off : off + size]
            self._filled(i, fh)
            return wire.reply(req.unique, data)
        hd = self.handles.get(fh)
        if hd is None or hd.ino != i:  # opened by a server before us: pinned from now on
            hd = Handle(i, self._data(k, idx))
            if fh and fh not in self.handles:
                self.handles[fh] = hd
        elif not off or off == hd.eof:  # a new pass: the current version
            hd.data = self._data(k, idx)
        chunk = hd.data[off : off + size]
        hd.eof = -1 if chunk else off
        return wire.reply(req.unique, chunk)

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
        self.told.pop(i, None)
        self.shrinking.pop(i, None)
        self.settling.discard(i)
        self.resizing.discard(i)
        self.fillers.pop(i, None)
        slot = self.table.get(i)
        if slot is not None and slot.count == 0:
            self._close_slot(i)

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
