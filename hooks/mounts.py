"""Bind tether's served files into a container before it starts (createRuntime).

runc (for podman too) makes config.json's mounts in the container's mount
namespace, then runs the createRuntime hooks, then pivot_root. A mount made
here, under the container's root, is therefore what the container sees at
`/etc/hosts`, on top of the runtime's own (podman's `/etc/hosts` and
`/etc/resolv.conf` are bind mounts too). nvidia-container-toolkit's hook
mounts its files the same way.

How, per file: clone the source with open_tree (in the hook's mount
namespace, where `<run_dir>/fs` is), enter the container's mount namespace
(setns), open the target inside the container's root with openat2
RESOLVE_IN_ROOT (an image's symlink cannot point a mount outside its root),
create it when missing, and attach the clone there with move_mount. The
clone is read-only, nosuid, nodev, noexec, whatever the source mount says.

Standard library only (ctypes); imported by the hook only when there is
something to mount. The hook is single-threaded, which setns into a mount
namespace requires.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_OPENAT2, SYS_MOUNT_SETATTR = 428, 429, 437, 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
CLONE_NEWNS = 0x00020000
MS_PRIVATE = 1 << 18
# filesystems a target must never be on: an image's /etc/hosts that is a
# symlink into the container's /proc or /sys (CVE-2019-16884's way)
PROC_SUPER_MAGIC, SYSFS_MAGIC = 0x9FA0, 0x62656572

_libc = ctypes.CDLL(None, use_errno=True)


class MountError(Exception):
    """A served file cannot be mounted; the message names the cause and the fix."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def clone(source: str) -> int:
    """A detached, read-only bind mount of `source` (a file or a directory)."""
    fd = _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC))
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, MS_PRIVATE, 0)
    try:
        _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)))
    except OSError:
        os.close(fd)
        raise
    return fd


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    return _check(_libc.syscall(SYS_OPENAT2, dirfd, path.encode(), ctypes.byref(how), ctypes.sizeof(how)))


def _create(root: int, rel: str, is_dir: bool) -> None:
    """Make `rel` (and its parents) under `root`, as a runtime makes mount points."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        last = i == len(parts)
        try:
            os.close(_openat2(root, path, os.O_PATH))
            continue
        except FileNotFoundError:
            pass
        parent = _openat2(root, "/".join(parts[: i - 1]) or ".", os.O_PATH | os.O_DIRECTORY)
        try:
            if last and not is_dir:
                os.close(os.open(parts[i - 1], os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent))
            else:
                os.mkdir(parts[i - 1], 0o755, dir_fd=parent)
        except FileExistsError:  # a symlink to a missing file: the image's choice, not ours to replace
            raise OSError(errno.ENOENT, "a symbolic link to a missing file") from None
        finally:
            os.close(parent)


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type comes first, a long
    _check(_libc.fstatfs(fd, buf))
    return ctypes.c_long.from_buffer(buf).value


def _target(root: int, rel: str, is_dir: bool) -> int:
    flags = os.O_PATH | (os.O_DIRECTORY if is_dir else 0)
    try:
        fd = _openat2(root, rel, flags)
    except FileNotFoundError:
        _create(root, rel, is_dir)
        fd = _openat2(root, rel, flags)
    if _fs_type(fd) in (PROC_SUPER_MAGIC, SYSFS_MAGIC):
        os.close(fd)
        raise MountError(
            f"/{rel} in the container's image leads into /proc or /sys (a symbolic link): tether does not mount "
            f"there; make /{rel} a plain {'directory' if is_dir else 'file'} in the image"
        )
    return fd


def bind_into(pid: int, rootfs: str, binds: list[tuple[str, str]]) -> None:
    """Bind each (source, destination) into the mount namespace of `pid`,
    `destination` inside `rootfs` as seen there. Sources are cloned first,
    in this process's mount namespace; this process stays in the container's
    afterwards (the hook exits)."""
    clones = []
    try:
        for source, dest in binds:
            try:
                fd = clone(source)
            except OSError as e:
                raise MountError(
                    f"cannot bind {source} ({e.strerror}): is tether-fused's mount there? see `tether doctor`"
                ) from None
            clones.append((fd, None, dest))  # closed in `finally` whatever follows
            try:
                clones[-1] = (fd, stat.S_ISDIR(os.fstat(fd).st_mode), dest)
            except OSError as e:
                raise MountError(f"cannot stat {source} ({e.strerror}): is tether's file server answering? see `tether doctor`") from None
        try:
            ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"cannot open the mount namespace of process {pid} ({e.strerror}): the container exited early") from None
        try:
            theirs, mine = os.fstat(ns), os.stat("/proc/self/ns/mnt")
            if (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino):
                raise MountError(
                    f"process {pid} shares the runtime's mount namespace: tether mounts its files only into a "
                    'container of its own (add {"type": "mount"} to linux.namespaces)'
                )
            _check(_libc.setns(ns, CLONE_NEWNS))
        except OSError as e:
            raise MountError(f"cannot enter the mount namespace of process {pid} ({e.strerror}): run the hook as root") from None
        finally:
            os.close(ns)
        try:
            root = _openat2(AT_FDCWD, rootfs, os.O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise MountError(f"cannot open the container's root {rootfs} ({e.strerror}): check root.path in config.json") from None
        try:
            for fd, is_dir, dest in clones:
                rel = dest.strip("/")
                try:
                    target = _target(root, rel, is_dir)
                except OSError as e:
                    raise MountError(
                        f"cannot create {dest} in the container's root {rootfs} ({e.strerror}): add an empty "
                        f"{dest}{'/' if is_dir else ''} to the image, or let `tether oci patch` write the mounts"
                    ) from None
                try:
                    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
                except OSError as e:
                    raise MountError(f"cannot mount tether's file on {dest} in the container ({e.strerror})") from None
                finally:
                    os.close(target)
        finally:
            os.close(root)
    finally:
        for fd, _, _ in clones:
            os.close(fd)
