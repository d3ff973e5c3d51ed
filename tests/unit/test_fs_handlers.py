"""fused.fs.handlers over fused.fs.wire: request bytes in, reply bytes out.

No root, no /dev/fuse: requests are packed here with wire.IN_HEADER, replies
unpacked with wire.OUT_HEADER and the body structs, and the backing files an
older (passthrough) file server left open are a fake that records what was
closed.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import stat
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused.fs import handlers as h
from fused.fs import wire

HOSTS, PORTS, ENV, RESOLV = h.FILES
DT_DIR, DT_REG = stat.S_IFDIR >> 12, stat.S_IFREG >> 12
ATTR_FIELDS = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec",
               "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")
INIT_TAIL = b"\0" * 44  # fuse_init_in's unused[11], after flags2
_uniques = itertools.count(0x100, 2)


# --- helpers ------------------------------------------------------------------------------
class FakeBacking:
    """Backing ids for immutable copies of bytes; refuses to close an id twice."""

    def __init__(self) -> None:
        self.next = 1
        self.live: dict[int, bytes] = {}
        self.opened: list[int] = []
        self.closed: list[int] = []

    def open(self, data: bytes) -> int:
        bid, self.next = self.next, self.next + 1
        self.live[bid] = bytes(data)
        self.opened.append(bid)
        return bid

    def close(self, bid: int) -> None:
        assert bid in self.live, f"backing id {bid} closed but not open"
        del self.live[bid]
        self.closed.append(bid)


def request(opcode: int, body: bytes = b"", nodeid: int = h.ROOT, unique: int | None = None, pid: int = 4242) -> bytes:
    if unique is None:
        unique = next(_uniques)
    return wire.IN_HEADER.pack(wire.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, pid, 0, 0) + body


def init_body(flags: int, flags2: int = 0, major: int = 7, minor: int = 40) -> bytes:
    return wire.INIT_IN.pack(major, minor, 1 << 17, flags) + struct.pack("<I", flags2) + INIT_TAIL


KERNEL_FLAGS = wire.ASYNC_READ | wire.PARALLEL_DIROPS | wire.MAX_PAGES | wire.INIT_EXT


class Reply:
    def __init__(self, raw: bytes, unique: int) -> None:
        assert isinstance(raw, bytes)
        length, self.error, got = wire.OUT_HEADER.unpack_from(raw)
        assert length == len(raw), "reply length field"
        assert got == unique, "reply unique"
        self.body = raw[wire.OUT_HEADER.size :]

    @property
    def errno(self) -> int:
        return -self.error


class FS:
    """A Handlers and the loop's side of it: handle, then written()."""

    def __init__(self, snap: h.Snapshot, mem: bytearray | None = None, backing: FakeBacking | None = None,
                 init: bool = True) -> None:
        self.mem = bytearray(24 * 64) if mem is None else mem
        self.backing = backing or FakeBacking()
        self.table = h.OpenTable(self.mem)
        self.h = h.Handlers(self.backing, self.table, snap)
        self.now = 1000.0
        self.h.clock = lambda: self.now
        if init:
            r = self.call(wire.INIT, init_body(KERNEL_FLAGS, wire.PASSTHROUGH2))
            assert r.error == 0

    def left_open(self, i: int, count: int = 1, data: bytes = b"old\n") -> int:
        """An older file server's passthrough opens of `i`, still open: its
        backing id, counted in the table, on a connection that negotiated it."""
        bid = self.backing.open(data)
        self.table.put(i, h.Slot(bid, count, h.digest(data), 0))
        self.h.passthrough = True
        return bid

    def raw(self, opcode: int, body: bytes = b"", nodeid: int = h.ROOT, unique: int | None = None):
        buf = request(opcode, body, nodeid, unique)
        (u,) = struct.unpack_from("<Q", buf, 8)
        out = self.h.handle(buf, len(buf))
        if out is not None:
            self.h.written()
        return out, u

    def call(self, opcode: int, body: bytes = b"", nodeid: int = h.ROOT, unique: int | None = None) -> Reply:
        out, u = self.raw(opcode, body, nodeid, unique)
        assert out is not None, "expected a reply"
        return Reply(out, u)

    # typed requests
    def lookup(self, parent: int, name: bytes | str) -> Reply:
        name = name.encode() if isinstance(name, str) else name
        return self.call(wire.LOOKUP, name + b"\0", parent)

    def entry(self, parent: int, name) -> tuple[tuple, dict]:
        r = self.lookup(parent, name)
        assert r.error == 0, os.strerror(r.errno)
        assert len(r.body) == wire.ENTRY_OUT.size + wire.ATTR.size
        attr = wire.ATTR.unpack_from(r.body, wire.ENTRY_OUT.size)
        return wire.ENTRY_OUT.unpack_from(r.body), dict(zip(ATTR_FIELDS, attr))

    def getattr(self, i: int) -> dict:
        r = self.call(wire.GETATTR, b"\0" * 16, i)
        assert r.error == 0, os.strerror(r.errno)
        assert len(r.body) == wire.ATTR_OUT.size + wire.ATTR.size
        return dict(zip(ATTR_FIELDS, wire.ATTR.unpack_from(r.body, wire.ATTR_OUT.size)))

    def open(self, i: int, flags: int = os.O_RDONLY, unique: int | None = None) -> Reply:
        return self.call(wire.OPEN, wire.OPEN_IN.pack(flags, 0), i, unique)

    def opened(self, i: int, flags: int = os.O_RDONLY, unique: int | None = None) -> tuple[int, int, int]:
        r = self.open(i, flags, unique)
        assert r.error == 0, os.strerror(r.errno)
        assert len(r.body) == wire.OPEN_OUT.size
        return wire.OPEN_OUT.unpack(r.body)  # fh, open_flags, backing_id

    def read(self, i: int, fh: int, off: int = 0, size: int = 1 << 16, flags: int = wire.READ_LOCKOWNER) -> bytes:
        """A read(2) of an open file (the kernel sets FUSE_READ_LOCKOWNER)."""
        r = self.call(wire.READ, wire.READ_IN.pack(fh, off, size, flags) + b"\0" * 16, i)
        assert r.error == 0, os.strerror(r.errno)
        return r.body

    def fill(self, i: int, fh: int, off: int = 0, size: int = 4096) -> bytes:
        """A READ that fills the page cache (sendfile, splice, mmap): no lock owner."""
        return self.read(i, fh, off, size, flags=0)

    def release(self, i: int, fh: int = 0) -> Reply:
        r = self.call(wire.RELEASE, wire.RELEASE_IN.pack(fh, 0, 0) + b"\0" * 8, i)
        assert r.error == 0 and r.body == b""
        return r

    def readdir(self, i: int, off: int = 0, size: int = 4096) -> Reply:
        return self.call(wire.READDIR, wire.READ_IN.pack(0, off, size, 0) + b"\0" * 16, i)

    def handles(self) -> dict:
        return self.h.handles

    def forget(self, i: int, nlookup: int = 1) -> None:
        out, _ = self.raw(wire.FORGET, wire.FORGET_IN.pack(nlookup), i)
        assert out is None


def dirents(body: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(body):
        ino_, off, namelen, kind = wire.DIRENT.unpack_from(body, pos)
        name = body[pos + wire.DIRENT.size : pos + wire.DIRENT.size + namelen]
        out.append((ino_, off, kind, name))
        pos += (wire.DIRENT.size + namelen + 7) // 8 * 8
    assert pos == len(body), "dirents end on a record boundary"
    return out


WEB = (b"127.0.0.1 localhost\n10.0.0.2 web\n", b"80/tcp\n", b"A=1\nB=2\n", b"nameserver 10.0.0.1\n")
DB = (b"10.0.0.3 db\n", b"5432/tcp\n", b"", b"nameserver 10.0.0.1\nsearch x\n")
DEFAULT = (b"127.0.0.1 localhost\n", b"", b"", b"nameserver 10.0.0.1\n")
T0 = 1_700_000_000_123_456_789


def snap1(**extra) -> h.Snapshot:
    return h.snapshot({"web": WEB, "db": DB, **extra}, DEFAULT, T0)


# --- INIT ---------------------------------------------------------------------------------
def test_init_negotiates_7x_and_never_passthrough_even_when_offered():
    fs = FS(snap1(), init=False)
    seen = []
    fs.h.on_init = seen.append
    other = 1 << 16  # WRITEBACK_CACHE: offered, not wanted
    r = fs.call(wire.INIT, init_body(KERNEL_FLAGS | other, wire.PASSTHROUGH2, minor=45))
    assert r.error == 0 and len(r.body) == wire.INIT_OUT.size == 64
    out = wire.INIT_OUT.unpack(r.body)
    major, minor, readahead, flags, _bg, _cong, max_write, _gran, max_pages, _al, flags2, depth = out
    assert (major, minor) == (7, 40)  # the kernel's 7.45 met with our 7.40
    assert readahead == 1 << 17
    assert flags == KERNEL_FLAGS and not flags & other
    assert flags2 == 0 and depth == 0  # no passthrough: a held file would never change (handlers.py)
    assert max_write == wire.MAX_WRITE and max_pages > 0
    assert fs.h.passthrough is False and fs.h.init.passthrough is False and fs.h.init.minor == 40
    assert seen == [fs.h.init]


def test_init_keeps_an_older_kernel_minor():
    fs = FS(snap1(), init=False)
    r = fs.call(wire.INIT, init_body(KERNEL_FLAGS, wire.PASSTHROUGH2, minor=31))
    assert wire.INIT_OUT.unpack(r.body)[1] == 31 and fs.h.init.minor == 31


@pytest.mark.parametrize("major", [6, 8])
def test_init_other_major_is_eproto(major):
    fs = FS(snap1(), init=False)
    r = fs.call(wire.INIT, init_body(KERNEL_FLAGS, wire.PASSTHROUGH2, major=major))
    assert r.errno == errno.EPROTO and r.body == b""
    assert fs.h.init is None


def test_init_short_body_is_einval():
    fs = FS(snap1(), init=False)
    assert fs.call(wire.INIT, wire.INIT_IN.pack(7, 40, 0, 0)[:12]).errno == errno.EINVAL
    assert fs.h.init is None


# --- LOOKUP -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["web", "db", "a", "0", "a-b", "x1-2-3y", "9lives", "a" * 63, "nobody-registered"])
def test_lookup_valid_label_is_a_directory(name):
    fs = FS(snap1())
    entry, attr = fs.entry(h.ROOT, name)
    assert entry[0] == h.ino(name) == attr["ino"]
    assert entry[0] % h.STRIDE == 0 and entry[0] != h.ROOT
    assert entry[1] == 0  # generation
    assert entry[2] == entry[3] == h.TIMEOUT
    assert attr["mode"] == stat.S_IFDIR | 0o555 and attr["nlink"] == 2


@pytest.mark.parametrize("name", [b"WEB", b"Web", b"a_b", b"a" * 64, b"-x", b"x-", b"a.b", b"", b"caf\xc3\xa9", b"\xff",
                                  b"a b", b"."])
def test_lookup_invalid_label_is_enoent(name):
    fs = FS(snap1())
    r = fs.lookup(h.ROOT, name)
    assert r.errno == errno.ENOENT and r.body == b""


@pytest.mark.parametrize("name", ["web", "stranger"])
def test_lookup_files_in_a_name_directory(name):
    fs = FS(snap1())
    d = h.ino(name)
    got = {}
    for f in h.FILES:
        entry, attr = fs.entry(d, f)
        assert entry[0] == h.ino(name, f) == attr["ino"]
        assert attr["mode"] == stat.S_IFREG | 0o444
        got[f] = entry[0]
    assert sorted(got.values()) == [d + 1, d + 2, d + 3, d + 4]


@pytest.mark.parametrize("name", [b"HOSTS", b"passwd", b"web", b".", b"hosts2", b"resolv", b"resolv.conf.bak"])
def test_lookup_other_names_in_a_name_directory_is_enoent(name):
    fs = FS(snap1())
    assert fs.lookup(h.ino("web"), name).errno == errno.ENOENT


@pytest.mark.parametrize("f", h.FILES)
def test_lookup_under_a_file_is_enotdir(f):
    fs = FS(snap1())
    assert fs.lookup(h.ino("web", f), "hosts").errno == errno.ENOTDIR


@pytest.mark.parametrize("nodeid", [0, 2, 4, h.ino("web") + 5, h.ino("web") + 7, (1 << h.KEY_BITS) * h.STRIDE])
def test_lookup_under_an_impossible_inode_is_enoent(nodeid):
    fs = FS(snap1())
    assert fs.lookup(nodeid, "hosts").errno == errno.ENOENT


def test_lookup_name_without_nul_is_einval():
    fs = FS(snap1())
    assert fs.call(wire.LOOKUP, b"web", h.ROOT).errno == errno.EINVAL


def test_inode_numbers_come_from_names_not_lookup_order():
    names = ["web", "db", "cache", "x"]
    a = FS(snap1())
    b = FS(h.snapshot({"x": DB}, h.EMPTY, 5))  # another snapshot, another process
    ia = {n: a.entry(h.ROOT, n)[0][0] for n in names}
    ib = {n: b.entry(h.ROOT, n)[0][0] for n in reversed(names)}
    assert ia == ib == {n: h.ino(n) for n in names}
    assert len(set(ia.values())) == len(names)
    fa = {n: a.entry(ia[n], RESOLV)[0][0] for n in names}
    fb = {n: b.entry(ib[n], RESOLV)[0][0] for n in reversed(names)}
    assert fa == fb == {n: h.ino(n, RESOLV) for n in names}


def test_inode_numbers_are_stable_across_versions():
    """A new file server (maybe a newer tether) answers for inodes the kernel
    got from the old one: the derivation is part of the on-mount format."""
    assert h.ino("web") == 539203233528944 and h.ino("web", RESOLV) == 539203233528948
    assert h.ino("a") == 122450331945504 and h.ino("a", HOSTS) == 122450331945505
    for n in ("web", "a", "x" * 63):
        k = int.from_bytes(hashlib.blake2b(n.encode(), digest_size=6).digest(), "little") % ((1 << 48) - 1) + 1
        assert h.key(n) == k and 0 < k < 1 << h.KEY_BITS
        assert [h.ino(n, f) for f in h.FILES] == [k * 8 + 1, k * 8 + 2, k * 8 + 3, k * 8 + 4]


# --- GETATTR ------------------------------------------------------------------------------
def test_getattr_sizes_modes_and_times():
    fs = FS(snap1())
    root = fs.getattr(h.ROOT)
    assert root["ino"] == h.ROOT and root["mode"] == stat.S_IFDIR | 0o555 and root["nlink"] == 2
    d = fs.getattr(h.ino("web"))
    assert d["mode"] == stat.S_IFDIR | 0o555 and d["ino"] == h.ino("web")
    sec, nsec = divmod(T0, 10**9)
    for name, data in (("web", WEB), ("db", DB), ("anyone", DEFAULT)):
        for f, b in zip(h.FILES, data):
            a = fs.getattr(h.ino(name, f))
            assert a["ino"] == h.ino(name, f)
            assert a["size"] == len(b)
            assert a["blocks"] == (len(b) + 511) // 512
            assert a["mode"] == stat.S_IFREG | 0o444 and a["nlink"] == 1
            assert (a["mtime"], a["mtimensec"]) == (sec, nsec)


def test_getattr_reply_header_carries_the_attr_timeout():
    fs = FS(snap1())
    r = fs.call(wire.GETATTR, b"\0" * 16, h.ino("web", HOSTS))
    assert wire.ATTR_OUT.unpack_from(r.body)[0] == h.TIMEOUT


@pytest.mark.parametrize("nodeid", [0, 3, h.ino("web") + 6])
def test_getattr_impossible_inode_is_enoent(nodeid):
    fs = FS(snap1())
    assert fs.call(wire.GETATTR, b"\0" * 16, nodeid).errno == errno.ENOENT


def test_publish_returns_exactly_the_changed_inodes_and_sizes_follow():
    fs = FS(snap1())
    web2 = (WEB[0] + b"10.0.0.9 new\n", WEB[1], WEB[2], WEB[3])
    new_ = (b"10.0.0.7 new\n", b"", b"", DEFAULT[3])  # hosts differs from the default, the rest do not
    snap2 = h.snapshot({"web": web2, "new": new_}, DEFAULT, T0 + 5 * 10**9)  # db gone: back to the default
    changed = fs.h.publish(snap2)
    want = {h.ino("web", HOSTS), h.ino("new", HOSTS)}
    want |= {h.ino("db", f) for f, a, b in zip(h.FILES, DB, DEFAULT) if a != b}
    assert len(changed) == len(set(changed))
    assert set(changed) == want
    assert fs.getattr(h.ino("web", HOSTS))["size"] == len(web2[0])
    assert fs.getattr(h.ino("web", PORTS))["size"] == len(WEB[1])
    assert fs.getattr(h.ino("db", RESOLV))["size"] == len(DEFAULT[3])
    assert fs.getattr(h.ino("new", HOSTS))["size"] == len(new_[0])
    # mtime moves for what changed, only
    assert fs.getattr(h.ino("web", HOSTS))["mtime"] == (T0 + 5 * 10**9) // 10**9
    assert fs.getattr(h.ino("web", PORTS))["mtime"] == T0 // 10**9


def test_publish_of_equal_bytes_changes_nothing():
    fs = FS(snap1())
    assert fs.h.publish(snap1()) == []  # equal bytes in new objects
    s = fs.h.snap
    assert fs.h.publish(h.snapshot(dict(s.files), s.default, T0 + 1)) == []


def test_publish_reports_default_change_for_a_looked_up_unlisted_name():
    fs = FS(snap1())
    fs.entry(h.ROOT, "stranger")  # the kernel now caches its entry and attributes for TIMEOUT
    i = h.ino("stranger", RESOLV)
    before = fs.getattr(i)["size"]
    default2 = (DEFAULT[0], DEFAULT[1], DEFAULT[2], b"nameserver 10.99.0.1\nsearch corp.example\n")
    changed = fs.h.publish(h.snapshot({"web": WEB, "db": DB}, default2, T0 + 1))
    assert fs.getattr(i)["size"] != before  # the served bytes did change...
    assert i in changed  # ...but the kernel is not told to drop the cached size


# --- OPEN / READ / RELEASE ----------------------------------------------------------------
def _publish(fs: FS, **files) -> None:
    s = fs.h.snap
    fs.h.publish(h.snapshot({**s.files, **files}, s.default, s.mtime_ns + 1))


def test_open_is_direct_io_with_a_handle_of_its_own():
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fh, flags, bid = fs.opened(i)
    assert flags == wire.DIRECT_IO | wire.NOFLUSH and bid == 0 and fh != 0
    fh2, _, _ = fs.opened(i)
    assert fh2 not in (0, fh)
    assert fs.read(i, fh) == fs.read(i, fh2) == WEB[0]
    # an unlisted name's file: the default bytes
    fh3, _, _ = fs.opened(h.ino("zzz", RESOLV))
    assert fs.read(h.ino("zzz", RESOLV), fh3) == DEFAULT[3]
    assert fs.backing.closed == [] and fs.table.slots == {}


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND,
                                   os.O_WRONLY | os.O_APPEND])
def test_open_for_writing_is_erofs(flags):
    fs = FS(snap1())
    r = fs.open(h.ino("web", ENV), flags)
    assert r.errno == errno.EROFS and fs.handles() == {}


@pytest.mark.parametrize("flags", [os.O_RDONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NOFOLLOW,
                                   os.O_RDONLY | os.O_NOATIME])
def test_open_read_only_with_harmless_flags(flags):
    fs = FS(snap1())
    assert fs.open(h.ino("web", ENV), flags).error == 0


@pytest.mark.parametrize("nodeid", [h.ROOT, h.ino("web"), h.ino("stranger")])
def test_open_directory_is_eisdir(nodeid):
    fs = FS(snap1())
    assert fs.open(nodeid).errno == errno.EISDIR and fs.handles() == {}


def test_open_impossible_inode_is_enoent():
    fs = FS(snap1())
    assert fs.open(2).errno == errno.ENOENT


def test_a_pass_reads_one_version_and_the_next_pass_the_current_one():
    """A read at offset 0 pins the current bytes; the reads after it go on in
    them, whatever is published meanwhile."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fh, _, _ = fs.opened(i)
    assert fs.read(i, fh, 0, 5) == WEB[0][:5]
    new = b"10.1.1.1 changed\n" * 3
    _publish(fs, web=(new,) + WEB[1:])
    assert fs.getattr(i)["size"] == len(new)  # fstat: what the next pass reads
    assert fs.read(i, fh, 5) == WEB[0][5:]  # the pass goes on in its version
    assert fs.read(i, fh, 4, 5) == WEB[0][4:9]
    assert fs.read(i, fh, len(WEB[0])) == b""  # its end: one empty read is not a new pass
    assert fs.read(i, fh, 0) == new  # a rewind is (tail -f after the file shrank)
    assert fs.read(i, fh, 0, 0) == b""


def test_an_open_after_a_publish_reads_it_while_another_holds_the_file():
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    holder, _, _ = fs.opened(i)
    assert fs.read(i, holder, 0, 4) == WEB[0][:4]
    new = b"10.9.9.9 version-b\n"
    _publish(fs, web=(new,) + WEB[1:])
    fh, _, _ = fs.opened(i)
    assert fs.read(i, fh) == new
    assert fs.read(i, holder, 4) == WEB[0][4:]
    fs.release(i, fh)
    fh, _, _ = fs.opened(i)
    assert fs.read(i, fh) == new


def test_a_reader_that_keeps_reading_at_the_end_moves_on_to_the_current_version():
    """`tail -f` after the file grew: it reads on from where it was. One read
    at the end (cat's) is the end of a pass; a second read there is a reader
    waiting for more."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fh, _, _ = fs.opened(i)
    end = len(WEB[0])
    assert fs.read(i, fh) == WEB[0]
    assert fs.read(i, fh, end) == b""
    assert fs.read(i, fh, end) == b""  # nothing new: still nothing
    longer = WEB[0] + b"10.0.0.9 cache\n"
    _publish(fs, web=(longer,) + WEB[1:])
    assert fs.read(i, fh, end) == longer[end:]
    assert fs.read(i, fh, len(longer)) == b""


def test_the_read_that_ends_a_pass_is_not_a_new_one():
    """cat reads to its first empty read: a change between its last bytes and
    that read must not add the new version's tail to the old one."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fh, _, _ = fs.opened(i)
    assert fs.read(i, fh) == WEB[0]
    _publish(fs, web=(WEB[0] + b"10.0.0.9 more\n",) + WEB[1:])
    assert fs.read(i, fh, len(WEB[0])) == b""


def test_read_without_a_handle_serves_current_bytes():
    fs = FS(snap1())
    assert fs.read(h.ino("db", PORTS), 0) == DB[1]
    assert fs.read(h.ino("db", PORTS), 0, 1, 3) == DB[1][1:4]
    assert fs.call(wire.READ, wire.READ_IN.pack(0, 0, 10, 0), h.ino("db")).errno == errno.EISDIR


def test_release_forgets_the_handle_and_unknown_ones_are_harmless():
    fs = FS(snap1())
    i = h.ino("web", ENV)
    fh, _, _ = fs.opened(i)
    other, _, _ = fs.opened(i)
    assert fs.read(i, other, 0, 2) == WEB[2][:2]
    _publish(fs, web=WEB[:2] + (b"NEW=1\n", WEB[3]))
    fs.release(i, fh + 1000)
    fs.release(h.ino("db", ENV), 0)
    fs.release(i, fh)
    assert set(fs.handles()) == {other}
    assert fs.read(i, other, 2) == WEB[2][2:]  # its pass is untouched


def test_a_handle_does_not_read_another_inodes_bytes():
    fs = FS(snap1())
    fh, _, _ = fs.opened(h.ino("web", HOSTS))
    assert fs.read(h.ino("db", HOSTS), fh) == DB[0]


def test_unanswered_open_leaves_no_handle():
    """The kernel refused the OPEN reply (the opener was interrupted): no
    RELEASE will ever come for it."""
    fs = FS(snap1())
    buf = request(wire.OPEN, wire.OPEN_IN.pack(os.O_RDONLY, 0), h.ino("web", PORTS))
    assert fs.h.handle(buf, len(buf)) is not None
    assert len(fs.handles()) == 1
    fs.h.unanswered()
    fs.h.written()
    assert fs.handles() == {}


def test_unanswered_after_written_changes_nothing():
    fs = FS(snap1())
    fs.opened(h.ino("web", PORTS))  # handle + written
    fs.h.unanswered()  # a later, unrelated refused reply
    assert len(fs.handles()) == 1


def test_the_page_cache_is_filled_with_the_version_whose_size_the_kernel_knows():
    """sendfile goes through the page cache, cut at the size the kernel was
    told: until it asks again (every open does, after the invalidation a
    publish sends), what fills the cache is the bytes of that size."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    assert fs.getattr(i)["size"] == len(WEB[0])
    fh, _, _ = fs.opened(i)
    new = WEB[0] + b"10.0.0.9 more\n"
    _publish(fs, web=(new,) + WEB[1:])
    assert fs.fill(i, fh) == WEB[0]  # no GETATTR since: the kernel's size is the old one
    assert fs.read(i, fh) == new  # a read(2) is cut by nothing: the current bytes
    fs.now += 2 * h.FILL_GUARD
    assert fs.getattr(i)["size"] == len(new)
    assert fs.fill(i, fh) == new
    assert fs.fill(i, fh, 4, 6) == new[4:10]
    fs.forget(i)  # the kernel dropped the inode: it will ask again
    assert i not in fs.h.told
    _publish(fs, web=WEB)
    assert fs.fill(i, 0) == WEB[0]  # nothing told: the current bytes


def _deferred(fs: FS, opcode: int, body: bytes, nodeid: int) -> int:
    out, u = fs.raw(opcode, body, nodeid)
    assert out is None and fs.h.deferred, "expected the reply to wait"
    return u


def test_a_size_change_waits_while_a_reader_that_filled_pages_has_the_file_open():
    """sendfile reads the size after its READ: a reply that changes it waits
    until that file is closed (or FILL_GUARD passed)."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fs.getattr(i)
    fh, _, _ = fs.opened(i)
    fs.fill(i, fh)
    new = WEB[0] + b"10.0.0.9 more\n"
    _publish(fs, web=(new,) + WEB[1:])
    u = _deferred(fs, wire.GETATTR, b"\0" * 16, i)
    assert fs.h.due() == []  # still open, and lately
    assert fs.getattr(h.ino("db", HOSTS))["size"] == len(DB[0])  # other inodes are not held back
    fs.release(i, fh)
    [out] = fs.h.due()
    r = Reply(out, u)
    assert wire.ATTR.unpack_from(r.body, wire.ATTR_OUT.size)[1] == len(new)
    assert fs.h.deferred == []
    # the same size goes at once; so does any size once the guard passed
    fh2, _, _ = fs.opened(i)
    fs.fill(i, fh2)
    assert fs.getattr(i)["size"] == len(new)
    _publish(fs, web=WEB)
    _deferred(fs, wire.LOOKUP, b"hosts\0", h.ino("web"))
    fs.now += 2 * h.FILL_GUARD
    [out] = fs.h.due()
    assert wire.ATTR.unpack_from(out, wire.OUT_HEADER.size + wire.ENTRY_OUT.size)[1] == len(WEB[0])


def test_a_held_back_reply_goes_after_later_max_all_the_same():
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    fs.getattr(i)
    fh, _, _ = fs.opened(i)
    fs.fill(i, fh)
    _publish(fs, web=(b"x\n",) + WEB[1:])
    u = _deferred(fs, wire.GETATTR, b"\0" * 16, i)
    for _ in range(3):  # a reader that keeps filling keeps the guard up...
        fs.now += h.FILL_GUARD / 2
        fs.fill(i, fh)
        assert fs.h.due() == []
    fs.now += h.LATER_MAX
    fs.fill(i, fh)
    [out] = fs.h.due()  # ...but not longer than LATER_MAX
    assert Reply(out, u).error == 0


def test_a_file_that_got_shorter_is_told_by_a_short_page_cache_read():
    """No attribute reply shrinks a size the kernel may have pages cached
    for: the first page-cache READ after the publish gets the new bytes."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    assert fs.getattr(i)["size"] == len(WEB[0])
    reader, _, _ = fs.opened(i)
    assert fs.fill(i, reader) == WEB[0]  # a reader's page, of the old size
    short = b"10.0.0.2 web\n"
    _publish(fs, web=(short,) + WEB[1:])
    assert fs.h.defer_shrinks([i, h.ino("web", PORTS)]) == [i]  # ports did not get shorter
    assert fs.h.path(i) == "web/hosts"
    # another task's attributes wait for that READ (one processed during its
    # flight would make the kernel ignore the size it brings)...
    stranger = request(wire.GETATTR, b"\0" * 16, i, pid=777)
    assert fs.h.handle(stranger, len(stranger)) is None and fs.h.deferred
    (g,) = struct.unpack_from("<Q", stranger, 8)
    fs.h.prober = 4242  # ...the file server's own do not: the old size, until the READ
    assert fs.getattr(i)["size"] == len(WEB[0])
    probe, _, _ = fs.opened(i)
    u = _deferred(fs, wire.READ, wire.READ_IN.pack(probe, 0, 4096, 0) + b"\0" * 16, i)
    fs.release(i, reader)
    [out] = fs.h.due()  # the READ (the attributes still wait for it)
    assert Reply(out, u).body == short and i not in fs.h.shrinking
    [out] = fs.h.due()
    assert wire.ATTR.unpack_from(Reply(out, g).body, wire.ATTR_OUT.size)[1] == len(short)
    assert fs.getattr(i)["size"] == len(short)


# every pass a reader makes is one whole published version, the version
# current when the pass began or a later one, however reads, publishes,
# other readers and page-cache fills interleave
PASS_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("read"), st.integers(0, 2), st.integers(1, 40)),
        st.tuples(st.just("close"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("publish"), st.just(0), st.integers(0, 60)),
        st.tuples(st.just("stat"), st.integers(0, 2), st.booleans()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PASS_OPS)
def test_every_pass_is_one_whole_version_no_older_than_its_start(ops):
    i = h.ino("web", HOSTS)
    versions = [WEB[0]]
    fs = FS(snap1())
    readers: dict[int, dict] = {}
    passes = 0
    for op, r, arg in ops:
        fs.now += 1.0  # (a size change waits for a page-cache reader: see the guard's tests)
        rd = readers.get(r)
        if op == "open" and rd is None:
            assert fs.getattr(i)["size"] == len(versions[-1])
            fh, _, _ = fs.opened(i)
            readers[r] = {"fh": fh, "off": 0, "got": b"", "since": len(versions) - 1}
        elif op == "stat":  # someone's fstat, and a page-cache fill: the size the kernel knows
            size = fs.getattr(i)["size"]
            if arg:
                assert fs.fill(i, 0, 0, 1 << 16) == versions[-1] and size == len(versions[-1])
        elif op == "read" and rd is not None:
            chunk = fs.read(i, rd["fh"], rd["off"], arg)
            if chunk:
                rd["got"] += chunk
                rd["off"] += len(chunk)
            else:  # the pass ended: whole, and not older than its start
                assert rd["got"] in versions[rd["since"]:]
                passes += 1
                rd.update(off=0, got=b"", since=len(versions) - 1)  # rewind: the next pass
        elif op == "close" and rd is not None:
            fs.release(i, rd["fh"])
            del readers[r]
        elif op == "publish":
            versions.append(b"".join(b"10.0.%d.%d name-%d\n" % (len(versions), k, k) for k in range(arg % 7 + 1)))
            _publish(fs, web=(versions[-1],) + WEB[1:])
    assert set(fs.handles()) == {rd["fh"] for rd in readers.values()}


# --- an older file server's passthrough opens ---------------------------------------------
def test_an_inode_an_older_server_left_open_gets_opens_that_name_its_backing_file():
    """The kernel allows one backing file per inode among its open files and
    fails (EIO) an open that brings another or no FOPEN_PASSTHROUGH
    (fs/fuse/iomode.c): our opens name the older server's backing file, with
    FOPEN_DIRECT_IO, so that their reads still come to us and are current."""
    fs = FS(snap1())
    i = h.ino("web", HOSTS)
    a = fs.left_open(i, count=1, data=b"old\n")
    fh, flags, bid = fs.opened(i)
    assert flags == wire.PASSTHROUGH_OPEN | wire.DIRECT_IO | wire.NOFLUSH and bid == a and fh
    assert fs.read(i, fh) == WEB[0]  # direct I/O: the current bytes, not the backing file's
    assert fs.table.get(i).count == 2
    fs.release(i, fh)  # ours
    assert fs.table.get(i).count == 1 and fs.backing.closed == []
    fs.release(i, 0)  # the older server's open (its handles are 0)
    assert fs.table.get(i) is None and fs.backing.closed == [a]
    fh, flags, bid = fs.opened(i)  # nothing holds a backing file now
    assert flags == wire.DIRECT_IO | wire.NOFLUSH and bid == 0


def test_a_backing_file_nothing_has_open_goes_at_the_next_open():
    fs = FS(snap1())
    i = h.ino("db", ENV)
    a = fs.left_open(i, count=0)
    _, flags, bid = fs.opened(i)
    assert bid == 0 and not flags & wire.PASSTHROUGH_OPEN
    assert fs.backing.closed == [a] and fs.table.slots == {}


def test_without_passthrough_on_the_connection_a_stale_record_is_dropped():
    fs = FS(snap1())
    i = h.ino("db", ENV)
    a = fs.left_open(i, count=3)
    fs.h.passthrough = False  # the connection never had it: the record cannot be true
    _, flags, bid = fs.opened(i)
    assert bid == 0 and fs.backing.closed == [a]


def test_backing_not_closed_while_counted_then_closed_on_forget():
    fs = FS(snap1())
    bk = fs.backing
    i = h.ino("db", ENV)
    a = fs.left_open(i)
    fs.forget(i)  # even a (bogus) FORGET must not close a backing file that is in use
    out, _ = fs.raw(wire.BATCH_FORGET, wire.BATCH_FORGET_IN.pack(1, 0) + wire.FORGET_ONE.pack(i, 1))
    assert out is None
    assert bk.closed == [] and fs.table.get(i).bid == a and fs.table.get(i).count == 1
    fs.table.count(i, -1, next(_uniques))  # its open was released while the record said so
    fs.forget(i)
    assert bk.closed == [a] and fs.table.get(i) is None
    assert h.OpenTable(fs.mem).get(i) is None  # gone from the shared memory too
    fs.forget(i)  # again: nothing left to close (FakeBacking refuses a double close)
    assert bk.closed == [a]


def test_batch_forget_closes_unused_backings_and_has_no_reply():
    fs = FS(snap1())
    bk = fs.backing
    ids = [h.ino("web", HOSTS), h.ino("db", HOSTS), h.ino("web", ENV)]
    bids = [fs.left_open(i, count=0 if n < 2 else 1) for n, i in enumerate(ids)]
    body = wire.BATCH_FORGET_IN.pack(3, 0) + b"".join(wire.FORGET_ONE.pack(i, 1) for i in ids)
    out, _ = fs.raw(wire.BATCH_FORGET, body)
    assert out is None
    assert sorted(bk.closed) == sorted(bids[:2])
    assert fs.table.get(ids[2]).bid == bids[2] and bids[2] in bk.live


def test_unanswered_open_naming_a_backing_file_is_not_counted():
    fs = FS(snap1())
    i = h.ino("web", PORTS)
    a = fs.left_open(i, count=1)
    buf = request(wire.OPEN, wire.OPEN_IN.pack(os.O_RDONLY, 0), i)
    out = fs.h.handle(buf, len(buf))
    assert wire.OPEN_OUT.unpack_from(out, wire.OUT_HEADER.size)[2] == a
    assert fs.table.get(i).count == 2
    fs.h.unanswered()
    fs.h.written()
    assert fs.table.get(i).count == 1 and fs.handles() == {}


def test_resent_open_is_counted_once():
    """A server that died after counting an OPEN but before answering it: the
    kernel resends the request (same unique, UNIQUE_RESEND set)."""
    mem = bytearray(24 * 64)
    fs = FS(snap1(), mem=mem)
    i = h.ino("web", HOSTS)
    fs.left_open(i, count=1)
    u = next(_uniques)
    buf = request(wire.OPEN, wire.OPEN_IN.pack(os.O_RDONLY, 0), i, u)
    assert fs.h.handle(buf, len(buf)) is not None  # ...and the reply is never written
    assert h.OpenTable(mem).get(i).count == 2
    fs2 = FS(snap1(), mem=mem, backing=fs.backing, init=False)
    fs2.h.passthrough = True  # what server.py sets from --passthrough
    r = fs2.open(i, unique=u | wire.UNIQUE_RESEND)
    assert r.error == 0
    assert fs2.table.get(i).count == 2 and h.OpenTable(mem).get(i).count == 2


def test_open_table_survives_the_server():
    mem = bytearray(24 * 64)
    fs = FS(snap1(), mem=mem)
    i, j = h.ino("web", HOSTS), h.ino("db", RESOLV)
    a = fs.left_open(i, count=0)
    b = fs.left_open(j, count=2)
    t2 = h.OpenTable(mem)
    assert t2.slots == fs.table.slots
    assert t2.get(i).bid == a and t2.get(i).count == 0
    assert t2.get(j).bid == b and t2.get(j).count == 2


def test_open_table_full_keeps_serving():
    mem = bytearray(h.OpenTable.REC.size)  # room for one inode
    fs = FS(snap1(), mem=mem)
    i, j = h.ino("web", HOSTS), h.ino("web", PORTS)
    fs.left_open(i)
    assert not fs.table.full
    fs.left_open(j)
    assert fs.table.full
    assert set(h.OpenTable(mem).slots) == {i}


def test_open_table_records_are_32_bytes_and_odd_tail_is_ignored():
    assert h.OpenTable.REC.size == 32
    mem = bytearray(3 * 32 + 7)
    t = h.OpenTable(mem)
    assert len(t._free) == 3 and t.slots == {}


# --- READDIR ------------------------------------------------------------------------------
def test_readdir_root_lists_dot_dotdot_then_sorted_names():
    fs = FS(h.snapshot({"zeta": DB, "alpha": WEB, "mid-1": DB}, DEFAULT, T0))
    r = fs.readdir(h.ROOT)
    assert r.error == 0
    ents = dirents(r.body)
    assert [e[3] for e in ents] == [b".", b"..", b"alpha", b"mid-1", b"zeta"]
    assert [e[1] for e in ents] == [1, 2, 3, 4, 5]
    assert all(e[2] == DT_DIR for e in ents)
    assert [e[0] for e in ents] == [h.ROOT, h.ROOT, h.ino("alpha"), h.ino("mid-1"), h.ino("zeta")]


def test_readdir_name_directory_lists_the_four_files():
    fs = FS(snap1())
    d = h.ino("stranger")
    ents = dirents(fs.readdir(d).body)
    assert [e[3] for e in ents] == [b".", b".."] + [f.encode() for f in h.FILES]
    assert [e[0] for e in ents] == [d, h.ROOT] + [h.ino("stranger", f) for f in h.FILES]
    assert [e[2] for e in ents] == [DT_DIR, DT_DIR] + [DT_REG] * 4


def test_readdir_offsets_continue_and_small_sizes_cut_at_whole_entries():
    names = [f"n{k:02d}" for k in range(20)]
    fs = FS(h.snapshot({n: DB for n in names}, DEFAULT, T0))
    full = dirents(fs.readdir(h.ROOT).body)
    assert len(full) == 22
    # "." and ".." are 32 bytes each
    assert [e[3] for e in dirents(fs.readdir(h.ROOT, 0, 64).body)] == [b".", b".."]
    assert [e[3] for e in dirents(fs.readdir(h.ROOT, 0, 63).body)] == [b"."]
    assert fs.readdir(h.ROOT, 0, 31).body == b""
    # continue from where the last reply stopped
    assert dirents(fs.readdir(h.ROOT, 5).body) == full[5:]
    got, off = [], 0
    while True:
        body = fs.readdir(h.ROOT, off, 100).body
        assert len(body) <= 100
        part = dirents(body)
        if not part:
            break
        got += part
        off = part[-1][1]
    assert got == full
    assert fs.readdir(h.ROOT, 22).body == b"" and fs.readdir(h.ROOT, 1 << 40).body == b""


def test_readdir_of_a_file_is_enotdir():
    fs = FS(snap1())
    assert fs.readdir(h.ino("web", ENV)).errno == errno.ENOTDIR


# --- other opcodes ------------------------------------------------------------------------
@pytest.mark.parametrize("op", [wire.SETATTR, wire.MKNOD, wire.MKDIR, wire.UNLINK, wire.RMDIR, wire.RENAME, wire.LINK,
                                wire.SYMLINK, wire.WRITE, wire.CREATE, wire.SETXATTR, wire.REMOVEXATTR])
def test_write_like_opcodes_are_erofs(op):
    fs = FS(snap1())
    r = fs.call(op, b"x\0" + b"\0" * 64, h.ino("web"))
    assert r.errno == errno.EROFS and r.body == b""


@pytest.mark.parametrize("op", [9999, wire.OPENDIR, wire.FLUSH, wire.GETXATTR, wire.LISTXATTR, wire.READLINK,
                                wire.FSYNC, wire.FSYNCDIR, 0])
def test_unknown_opcodes_are_enosys(op):
    fs = FS(snap1())
    r = fs.call(op, b"\0" * 16, h.ino("web", HOSTS))
    assert r.errno == errno.ENOSYS and r.body == b""


def test_interrupt_has_no_reply():
    fs = FS(snap1())
    out, _ = fs.raw(wire.INTERRUPT, struct.pack("<Q", 12345))
    assert out is None


@pytest.mark.parametrize("op", [wire.RELEASEDIR, wire.DESTROY])
def test_releasedir_and_destroy_get_an_empty_reply(op):
    fs = FS(snap1())
    r = fs.call(op, b"\0" * 24, h.ROOT)
    assert r.error == 0 and r.body == b""


def test_access():
    fs = FS(snap1())
    assert fs.call(wire.ACCESS, wire.ACCESS_IN.pack(os.R_OK, 0), h.ino("web", HOSTS)).error == 0
    assert fs.call(wire.ACCESS, wire.ACCESS_IN.pack(os.R_OK | os.X_OK, 0), h.ino("web")).error == 0
    assert fs.call(wire.ACCESS, wire.ACCESS_IN.pack(os.W_OK, 0), h.ino("web", HOSTS)).errno == errno.EROFS
    assert fs.call(wire.ACCESS, wire.ACCESS_IN.pack(os.R_OK, 0), 2).errno == errno.ENOENT


def test_statfs():
    fs = FS(snap1())
    r = fs.call(wire.STATFS, b"", h.ROOT)
    assert r.error == 0 and len(r.body) == wire.STATFS_OUT.size
    _blocks, _bfree, _bavail, files, _ffree, bsize, namelen, _frsize, _ = wire.STATFS_OUT.unpack(r.body)
    assert files == 2 * 5 + 1 and bsize == 4096 and namelen == 63


# --- malformed input ----------------------------------------------------------------------
def test_shorter_than_the_header_is_malformed():
    fs = FS(snap1())
    buf = request(wire.GETATTR, b"", h.ROOT)
    with pytest.raises(wire.Malformed):
        fs.h.handle(buf[:20], 20)
    with pytest.raises(wire.Malformed):
        fs.h.handle(b"", 0)


def test_length_field_not_what_was_read_is_malformed():
    fs = FS(snap1())
    buf = request(wire.GETATTR, b"\0" * 16, h.ino("web", HOSTS))
    with pytest.raises(wire.Malformed):
        fs.h.handle(buf + b"\0", len(buf) + 1)
    with pytest.raises(wire.Malformed):
        fs.h.handle(buf[:-1], len(buf) - 1)


def test_request_at_the_start_of_a_bigger_buffer():
    """The loop reads into one big buffer and passes how much one read() returned."""
    fs = FS(snap1())
    buf = bytearray(wire.BUFSIZE)
    req = request(wire.GETATTR, b"\0" * 16, h.ino("web", HOSTS), 77)
    buf[: len(req)] = req
    buf[len(req) : len(req) + 8] = b"\xff" * 8  # stale bytes of an earlier request
    r = Reply(fs.h.handle(buf, len(req)), 77)
    assert r.error == 0
    assert wire.ATTR.unpack_from(r.body, wire.ATTR_OUT.size)[1] == len(WEB[0])


@pytest.mark.parametrize("op, nodeid, body", [
    (wire.OPEN, h.ino("web", HOSTS), b"\0\0\0"),
    (wire.OPEN, h.ino("web", HOSTS), b""),
    (wire.READ, h.ino("web", HOSTS), wire.READ_IN.pack(0, 0, 10, 0)[:20]),
    (wire.READ, h.ino("web", HOSTS), b""),
    (wire.RELEASE, h.ino("web", HOSTS), b"\0" * 7),
    (wire.RELEASE, h.ino("web", HOSTS), b"\0" * 15),
    (wire.READDIR, h.ROOT, b"\0" * 20),
    (wire.READDIR, h.ROOT, b""),
    (wire.ACCESS, h.ino("web", HOSTS), b"\0" * 4),
    (wire.LOOKUP, h.ROOT, b""),
])
@pytest.mark.parametrize("older", [True, False])
def test_truncated_body_is_einval(op, nodeid, body, older):
    fs = FS(snap1())
    if older:
        fs.left_open(h.ino("web", HOSTS))
    r = fs.call(op, body, nodeid)
    assert r.errno == errno.EINVAL and r.body == b""
    assert fs.handles() == {} and fs.backing.closed == []


# --- a file server that replaces a dead one ----------------------------------------------
def _restart():
    mem = bytearray(24 * 64)
    fs1 = FS(snap1(), mem=mem)
    a = h.ino("web", HOSTS)
    fh_a, _, _ = fs1.opened(a)  # the reader keeps its file open; the server dies
    assert fs1.read(a, fh_a, 0, 3) == WEB[0][:3]
    fs2 = FS(snap1(), mem=mem, init=False)
    b = h.ino("db", HOSTS)
    fh_b, _, _ = fs2.opened(b)
    assert fs2.read(b, fh_b) == DB[0]
    return fs2, a, fh_a, b, fh_b


def test_direct_fh_from_a_dead_server_reads_on_in_the_same_snapshot():
    fs2, a, fh_a, _b, _fh_b = _restart()
    # the first reader goes on reading its file, with the handle it was given
    assert fs2.read(a, fh_a, 3) == WEB[0][3:]
    assert fs2.read(a, fh_a, 0) == WEB[0]


def test_release_of_a_dead_servers_fh_keeps_other_pins():
    fs2, a, fh_a, b, fh_b = _restart()
    fs2.h.publish(h.snapshot({"web": WEB, "db": (b"10.0.0.33 db\n",) + DB[1:]}, DEFAULT, T0 + 1))
    fs2.release(a, fh_a)  # the first reader closes its file
    assert fs2.read(b, fh_b, 1) == DB[0][1:]  # the second reader's pass goes on in its version


# --- fuzz ---------------------------------------------------------------------------------
OPCODES = [wire.LOOKUP, wire.FORGET, wire.GETATTR, wire.SETATTR, wire.OPEN, wire.READ, wire.RELEASE, wire.STATFS,
           wire.FLUSH, wire.INIT, wire.OPENDIR, wire.READDIR, wire.RELEASEDIR, wire.ACCESS, wire.INTERRUPT,
           wire.DESTROY, wire.BATCH_FORGET, wire.CREATE, wire.WRITE]
NODEIDS = [0, h.ROOT, 2, h.ino("web"), h.ino("web", HOSTS), h.ino("web", RESOLV), h.ino("zz", ENV), h.ino("web") + 5]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    opcode=st.one_of(st.sampled_from(OPCODES), st.integers(0, 2**32 - 1)),
    nodeid=st.one_of(st.sampled_from(NODEIDS), st.integers(0, 2**64 - 1)),
    unique=st.integers(0, 2**64 - 1),
    body=st.binary(max_size=200),
    older=st.booleans(),
)
def test_fuzz_any_body_gets_a_well_formed_reply_or_none(opcode, nodeid, unique, body, older):
    fs = FS(snap1(), init=False)
    if older:
        fs.left_open(h.ino("web", HOSTS))
    buf = request(opcode, body, nodeid, unique)
    try:
        out = fs.h.handle(buf, len(buf))
    except wire.Malformed:  # allowed by the contract; with a correct header, see below
        out = "malformed"
    # a whole header never makes the request vanish without a reply...
    assert out != "malformed", "a correct header raised Malformed: the kernel would wait forever"
    if out is None:
        # ...but for the requests that have none
        assert opcode in (wire.FORGET, wire.BATCH_FORGET, wire.INTERRUPT)
        return
    assert isinstance(out, bytes)
    length, err, u = wire.OUT_HEADER.unpack_from(out)
    assert u == unique
    assert length == len(out)
    assert -4095 <= err <= 0
    if err:
        assert len(out) == wire.OUT_HEADER.size
