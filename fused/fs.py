"""The served files: a read-only pyfuse3 filesystem over published snapshots.

    <run_dir>/fs/<name>/{hosts,ports,env,resolv.conf}

It reaches into nothing but the `Snapshot` it was last given (never the store,
never the kernel wiring), so it can later move into a process of its own.

Freshness and speed: files are opened with `keep_cache`, so repeated reads of
an unchanged file come from the kernel's page cache; `publish()` swaps the
snapshot (one reference assignment: a read sees all of one snapshot) and then
invalidates exactly the inodes whose bytes changed, outside any request
handler.

Inodes: root is 1; the directory of the k-th name ever looked up is 16k and
its files are 16k+1..16k+4. A name keeps its number while the kernel knows it.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

import pyfuse3

from .model import is_label
from .render import FILES, Snapshot, changed_files

log = logging.getLogger("tether.fs")

ROOT = pyfuse3.ROOT_INODE
STRIDE = 16
TIMEOUT = 3600.0  # entries and attributes: invalidated explicitly on change


class TetherFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self._start_ns = time.time_ns()
        self.snapshot = Snapshot(mtime_ns=self._start_ns)
        self._mtimes: dict[tuple[str, str], int] = {}
        self._k_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._next_k = 1
        self._nlookup: dict[int, int] = {}
        self.invalidations = 0

    # --- publishing (called by the service, never from a handler) ----------
    def publish(self, snap: Snapshot) -> int:
        old, self.snapshot = self.snapshot, snap
        known = list(self._k_of)
        changed = changed_files(old, snap, known)
        for name, f in changed:
            self._mtimes[(name, f)] = snap.mtime_ns
        for name, f in changed:
            ino = self._k_of[name] * STRIDE + 1 + FILES.index(f)
            if self._nlookup.get(ino):
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
                    self.invalidations += 1
                except OSError as e:  # the kernel forgot it meanwhile
                    if e.errno not in (errno.ENOENT, errno.EBADF):
                        raise
        return len(changed)

    # --- inode table --------------------------------------------------------
    def _dir_ino(self, name: str) -> int:
        k = self._k_of.get(name)
        if k is None:
            k = self._next_k
            self._next_k += 1
            self._k_of[name] = k
            self._name_of[k] = name
        return k * STRIDE

    def _decode(self, ino: int) -> tuple[str, str | None]:
        k, i = divmod(ino, STRIDE)
        name = self._name_of.get(k)
        if name is None or i > len(FILES):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return name, (FILES[i - 1] if i else None)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_uid = 0
        a.st_gid = 0
        a.st_blksize = 4096
        mtime = self._start_ns
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
        else:
            name, f = self._decode(ino)
            if f is None:
                a.st_mode = stat.S_IFDIR | 0o555
                a.st_nlink = 2
            else:
                data = self.snapshot.files.get(name, self.snapshot.default).get(f)
                a.st_mode = stat.S_IFREG | 0o444
                a.st_nlink = 1
                a.st_size = len(data)
                a.st_blocks = (len(data) + 511) // 512
                mtime = self._mtimes.get((name, f), mtime)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _counted(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = self._attr(ino)
        self._nlookup[ino] = self._nlookup.get(ino, 0) + 1
        return attr

    # --- requests -----------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            s = name.decode("ascii")
        except UnicodeDecodeError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if parent_inode == ROOT:
            if s == ".":
                return self._counted(ROOT)
            if not is_label(s):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._counted(self._dir_ino(s))
        dname, f = self._decode(parent_inode)
        if f is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if s == "..":
            return self._counted(ROOT)
        if s == ".":
            return self._counted(parent_inode)
        if s not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._counted(parent_inode + 1 + FILES.index(s))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self._nlookup.get(ino, 0) - n
            if left > 0:
                self._nlookup[ino] = left
                continue
            self._nlookup.pop(ino, None)
            if ino == ROOT:
                continue
            k = ino // STRIDE
            name = self._name_of.get(k)
            # a name no longer known to the kernel (dir nor files) and not
            # registered: drop its number
            if name is not None and name not in self.snapshot.files:
                if not any(self._nlookup.get(k * STRIDE + i) for i in range(len(FILES) + 1)):
                    del self._name_of[k]
                    del self._k_of[name]
                    for f in FILES:
                        self._mtimes.pop((name, f), None)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        raise pyfuse3.FUSEError(errno.EROFS)

    async def access(self, inode, mode, ctx):
        self._attr(inode)
        return not (mode & os.W_OK)

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            _, f = self._decode(inode)
            if f is not None:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if fh == ROOT:
            entries = [(n, self._dir_ino(n)) for n in sorted(self.snapshot.files)]
        else:
            entries = [(f, fh + 1 + i) for i, f in enumerate(FILES)]
        for i, (n, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, n.encode(), self._attr(ino), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        _, f = self._decode(inode)
        if f is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh, off, size):
        name, f = self._decode(fh)
        data = self.snapshot.files.get(name, self.snapshot.default).get(f)
        return data[off : off + size]

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._name_of) * (len(FILES) + 1) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 63
        return s

    # everything that would change the tree: read-only
    async def _erofs(self, *a, **k):
        raise pyfuse3.FUSEError(errno.EROFS)

    mknod = mkdir = unlink = rmdir = symlink = rename = link = create = write = _erofs
    setxattr = removexattr = _erofs


FUSE_OPTIONS = ("fsname=tether", "subtype=tether", "ro", "allow_other", "default_permissions", "nodev", "nosuid")


def mount(ops: TetherFS, mountpoint: str) -> None:
    os.makedirs(mountpoint, exist_ok=True)
    pyfuse3.init(ops, mountpoint, set(FUSE_OPTIONS))


def unmount() -> None:
    pyfuse3.close(unmount=True)
