"""A served file someone holds open still follows every change, whole.

The holders: a shell in the container with /etc/hosts open on fd 3, a host
process with <run_dir>/fs/web/hosts open, and `tail -f` (busybox, in the
container). Then a minute of retargets with readers that hold the file open
for a while before they read it, through read(2) and through sendfile.
"""
from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from harness import Daemon, wait_for
from fused.protocol import request

SLEEP = ["sleep", "1000000"]
SOAK = float(os.environ.get("TETHER_HELD_SOAK_S", "60"))


@pytest.fixture(scope="module")
def linked(rootfs):
    """db, db2, db3 (one port each); web --link db2:database (the longest line first)."""
    d = Daemon(rootfs)
    try:
        d.start()
        for name in ("db", "db2", "db3"):
            d.start_container(name, None, "--expose", "5432")
        d.start_container("web", SLEEP, "--link", "db2:database")
        yield d
    finally:
        d.close()


def retarget(d, target: str) -> None:
    request(str(d.sock), "link_retarget", {"consumer": "web", "alias": "database", "target": target})


def host_pid_of(d, cid: str, argv: list[str]) -> int:
    """The host pid of the process in container `cid` whose argv is `argv`."""
    want = ("\0".join(argv) + "\0").encode()
    init = int(d.runc("state", cid).stdout.split('"pid": ')[1].split(",")[0])
    mnt = os.readlink(f"/proc/{init}/ns/mnt")

    def find():
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if open(f"/proc/{p}/cmdline", "rb").read() == want and os.readlink(f"/proc/{p}/ns/mnt") == mnt:
                        return int(p)
                except OSError:
                    continue
        return None

    return wait_for(find, what=f"{argv} in {cid}")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_held_open_files_and_tail_f_follow_a_change(linked):
    d = linked
    path = d.run_dir / "fs" / "web" / "hosts"
    line = lambda target: f"\tdatabase {target}\n"  # noqa: E731
    assert line("db2") in path.read_text()
    # the holders: a shell in web with /etc/hosts on fd 3, this process on the host, tail -f in web
    holder = subprocess.Popen(["runc", "--root", str(d.runc_root), "exec", "web", "sh", "-c", "exec 3</etc/hosts; exec sleep 600"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host_fd = os.open(path, os.O_RDONLY)
    tail = subprocess.Popen(["runc", "--root", str(d.runc_root), "exec", "web", "tail", "-f", "/etc/hosts"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = bytearray()
    reader = threading.Thread(target=lambda: [out.extend(c) for c in iter(lambda: os.read(tail.stdout.fileno(), 65536), b"")],
                              daemon=True)
    reader.start()
    try:
        tail_pid = host_pid_of(d, "web", ["tail", "-f", "/etc/hosts"])
        host_pid_of(d, "web", ["sleep", "600"])
        wait_for(lambda: line("db2").encode() in out, what="tail printing the file")
        assert os.read(host_fd, 65536).decode().endswith(line("db2"))
        # a retarget that makes the file shorter (db2 -> db)
        retarget(d, "db")
        now = path.read_text()  # the first open on the host after the retarget returned
        assert line("db") in now and "db2" not in now
        assert d.exec("web", "cat", "/etc/hosts").stdout == now  # and in the container (sendfile)
        # the held host fd: fstat is the size of what the next pass reads, and a rewind reads it
        assert os.fstat(host_fd).st_size == len(now)
        assert os.pread(host_fd, 65536, 0).decode() == now
        # tail -f prints the new contents (it rewinds: the file shrank) and then rests
        wait_for(lambda: out.decode().endswith(now), timeout=5, what="tail -f printing the new contents")
        c0 = cpu_seconds(tail_pid)
        time.sleep(10)
        used = (cpu_seconds(tail_pid) - c0) / 10
        assert used < 0.05, f"tail -f used {used:.0%} of a CPU"
        # a change that makes the file longer (db -> db2): tail -f reads on from where it was,
        # as on any file that grew
        retarget(d, "db2")
        longer = path.read_text()
        assert line("db2") in longer and len(longer) == len(now) + 1
        assert os.fstat(host_fd).st_size == len(longer)
        wait_for(lambda: out.decode().endswith(now + longer[len(now):]), timeout=5,
                 what="tail -f printing what the longer file added")
        assert d.exec("web", "cat", "/etc/hosts").stdout == longer
    finally:
        os.close(host_fd)
        for p in (tail, holder):
            p.terminate()
        d.runc("exec", "web", "pkill", "-f", "tail -f /etc/hosts", check=False)
        d.runc("exec", "web", "pkill", "-f", "sleep 600", check=False)
        for p in (tail, holder):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _read_pass(path: str, how: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        time.sleep(random.uniform(0, 0.5))  # held open before it is read
        if how == "sendfile":
            r, w = os.pipe()
            try:
                got = bytearray()
                while True:
                    n = os.sendfile(w, fd, None, 65536)
                    if not n:
                        return bytes(got)
                    got += os.read(r, n)
            finally:
                os.close(r), os.close(w)
        got = bytearray()
        while chunk := os.read(fd, 7):  # small reads: a pass spans many requests
            got += chunk
        return bytes(got)
    finally:
        os.close(fd)


def test_a_minute_of_retargets_with_readers_that_hold_the_file(linked):
    """Every read is whole and one of the published versions; a read whose
    open started after a retarget returned reads that version or a later one."""
    d = linked
    path = str(d.run_dir / "fs" / "web" / "hosts")
    targets = ["db", "db2", "db3"]
    versions: list[tuple[str, float, float]] = []  # (content, call started, returned)
    reads: list[tuple[bytes, float, float]] = []  # (content, open started, read ended)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(how: str) -> None:
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                data = _read_pass(path, how)
                reads.append((data, t0, time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # in the container too: busybox cat (sendfile) of an fd opened up to half a second before
    looper = subprocess.Popen(
        ["runc", "--root", str(d.runc_root), "exec", "web", "sh", "-c",
         "echo $$; while :; do exec 3</etc/hosts; usleep $((RANDOM % 500000)); cat <&3 || echo FAILED; exec 3<&-; echo @@; done"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop_pid = looper.stdout.readline().decode().strip()
    inside: list[bytes] = []
    drain = threading.Thread(target=lambda: inside.append(looper.stdout.read()), daemon=True)
    drain.start()
    threads = [threading.Thread(target=reader, args=(how,), daemon=True) for how in ("read", "read", "sendfile", "sendfile")]
    for t in threads:
        t.start()
    try:
        content = open(path).read()
        versions.append((content, 0.0, 0.0))
        deadline = time.monotonic() + SOAK
        n = 0
        while time.monotonic() < deadline:
            n += 1
            t0 = time.monotonic()
            retarget(d, targets[n % 3])
            t1 = time.monotonic()
            versions.append((open(path).read(), t0, t1))
            time.sleep(random.uniform(0, 0.05))
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        d.runc("exec", "web", "kill", loop_pid, check=False)
        looper.wait(10)
        drain.join(10)
    assert not errors, errors[:3]
    contents = {v[0].encode() for v in versions}
    assert len(contents) == 3 and n > 100 and len(reads) > 100
    for data, opened, ended in reads:
        assert data in contents, f"a torn read: {data!r}"
        # the versions it may show: the last one returned before its open, and any begun before it ended
        last = max(k for k, v in enumerate(versions) if v[2] <= opened)
        allowed = {versions[k][0].encode() for k in range(last, len(versions)) if k == last or versions[k][1] <= ended}
        assert data in allowed, f"a read that opened after version {last} returned got an older one"
    passes = inside[0].decode().split("@@\n")[:-1]
    assert len(passes) > 50
    bad = [p for p in passes if p.encode() not in contents]
    assert not bad, bad[:3]
