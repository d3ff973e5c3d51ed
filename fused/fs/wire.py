"""The kernel's FUSE protocol (linux/fuse.h), sans-IO: bytes in, bytes out.

Nothing here opens /dev/fuse or reads a socket. The file server feeds request
bytes to `parse` and writes what `reply`, `error` and the notify builders
return; the unit tests do the same with no kernel at all.
"""
from __future__ import annotations

import errno
import struct
from typing import NamedTuple

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 5, 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 20, 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET = 42
# notify codes (a reply header with unique 0 and the code in `error`)
NOTIFY_INVAL_INODE, NOTIFY_RESEND = 2, 7
# a request the kernel sends again after NOTIFY_RESEND carries this bit
UNIQUE_RESEND = 1 << 63

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid (+nsec) ... then fuse_attr
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then fuse_attr
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (rest ignored)
# read_flags: set on a read(2) of a direct I/O file (fuse_send_read), never
# on a READ that fills the page cache (readahead, read_folio: splice, mmap)
READ_LOCKOWNER = 1 << 1
RELEASE_IN = struct.Struct("<QII")  # fh flags release_flags (lock_owner ignored)
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy, then count x (nodeid, nlookup)
FORGET_ONE = struct.Struct("<QQ")
ACCESS_IN = struct.Struct("<II")  # mask padding
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # 80 bytes
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8
NOTIFY_INVAL = struct.Struct("<Qqq")  # ino off len

# FOPEN_* (open_out.open_flags)
DIRECT_IO, KEEP_CACHE, NOFLUSH, PASSTHROUGH_OPEN = 1 << 0, 1 << 1, 1 << 5, 1 << 7
# FUSE_* (init flags), flags2 is the high word
ASYNC_READ, PARALLEL_DIROPS, MAX_PAGES, INIT_EXT = 1 << 0, 1 << 18, 1 << 22, 1 << 30
PASSTHROUGH2 = 1 << (37 - 32)

PROTO_MAJOR, PROTO_MINOR = 7, 40
# a read-only filesystem gets no big writes: requests are small, and the
# kernel needs a read buffer of at least max_write + one page
MAX_WRITE = 1 << 15
BUFSIZE = MAX_WRITE + (1 << 15)


class Request(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    pid: int
    body: memoryview


class Malformed(ValueError):
    """Bytes that are not a whole FUSE request."""


def parse(buf, n: int | None = None) -> Request:
    """One request from the first `n` bytes of `buf` (what one read() of
    /dev/fuse returned). The body is a view into `buf`: no copy."""
    view = memoryview(buf)
    if n is None:
        n = len(view)
    if n < IN_HEADER.size:
        raise Malformed(f"request of {n} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, _gid, pid, _ext, _pad = IN_HEADER.unpack_from(view)
    if length != n:
        raise Malformed(f"request says {length} bytes, read {n}")
    return Request(opcode, unique, nodeid, uid, pid, view[IN_HEADER.size : n])


def reply(unique: int, body: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def error(unique: int, err: int) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size, -err, unique)


def notify_inval_inode(ino: int) -> bytes:
    """Drop the kernel's cached attributes of `ino`. Offset -1: not its
    pages, whose invalidation waits for pages being filled, which the FUSE
    thread that writes this must answer first. Pages go without it: when
    the next attributes bring another size, and at every open."""
    return OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_INVAL.size, NOTIFY_INVAL_INODE, 0) + NOTIFY_INVAL.pack(ino, -1, 0)


def notify_resend() -> bytes:
    """Ask the kernel to queue again every request a server read but never
    answered (Linux 6.9+): what a server that died was holding."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0)


def cstring(body: memoryview) -> bytes:
    """A NUL-terminated name at the start of a request body."""
    raw = bytes(body)
    end = raw.find(b"\0")
    if end < 0:
        raise Malformed("name without its NUL terminator")
    return raw[:end]


class Init(NamedTuple):
    minor: int
    passthrough: bool
    reply: bytes


def init(body: memoryview) -> Init:
    """Negotiate: protocol 7.x, async reads, parallel dirops; never
    passthrough (handlers.py says why)."""
    if len(body) < INIT_IN.size:
        raise Malformed("INIT shorter than fuse_init_in")
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body)
    if major != PROTO_MAJOR:
        raise OSError(errno.EPROTO, f"FUSE protocol {major} not supported")
    want = flags & (ASYNC_READ | PARALLEL_DIROPS | MAX_PAGES | INIT_EXT)
    minor = min(minor, PROTO_MINOR)
    out = INIT_OUT.pack(PROTO_MAJOR, minor, max_readahead, want, 16, 12, MAX_WRITE, 1, 32, 0, 0, 0)
    return Init(minor, False, out)


def dirent(ino: int, offset: int, name: bytes, kind: int) -> bytes:
    """One fuse_dirent; `kind` is the S_IFMT bits >> 12 (DT_*)."""
    rec = DIRENT.pack(ino, offset, len(name), kind) + name
    return rec + b"\0" * (-len(rec) % 8)
