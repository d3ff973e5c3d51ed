"""Read a ~500-byte hosts file (open, read, close) from tmpfs, tether and LXCFS,
with the reader pinned to the file server's CPU, to another CPU, and unpinned.

    .venv/bin/python -m bench.read_hosts [--reads 20000] [--links 12] [--no-pin] [--no-lxcfs]

One run, interleaved in blocks so machine drift cancels; prints medians, p90
and the ratios. The tether file is served by an isolated tether-fused whose
link graph is filled through the control socket (no containers needed: a
link's consumer is a registered name, here registered by a real runc
container). Each open is one FUSE OPEN round trip to the file server
(<run_dir>/fsd.pid), so where the reader and the file server run matters:

  <fs>            nothing pinned (the scheduler's choice, as in production)
  <fs> same CPU   the reader and every thread of the server on one CPU
  <fs> other CPU  the reader on that CPU, the server on another one
  tmpfs pinned    the reader alone on that CPU (what "same CPU" compares with)

LXCFS (/proc/uptime of an `lxcfs -f` of our own) is read the same way when it
is installed (`make bench-deps`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import build_rootfs, sh  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402

WARMUP = 200  # reads after each change of pinning, not counted


def per_read_us(path: str, n: int, how: str = "read") -> list[float]:
    """n timings (µs) of open+read+close, in blocks of 100 to keep clock
    overhead low. `how`: "read" (read(2), what libc's resolver does),
    "sendfile" (into a pipe, what busybox cat does), "held" (read(2) while
    another descriptor holds the file open)."""
    out = []
    o, r, c = os.open, os.read, os.close
    flags = os.O_RDONLY
    holder = o(path, flags) if how == "held" else None
    pipe = os.pipe() if how == "sendfile" else None
    try:
        for _ in range(n // 100):
            t0 = time.perf_counter_ns()
            if pipe is None:
                for _ in range(100):
                    fd = o(path, flags)
                    r(fd, 65536)
                    c(fd)
            else:
                send, rd, w = os.sendfile, pipe[0], pipe[1]
                for _ in range(100):
                    fd = o(path, flags)
                    n_ = send(w, fd, None, 65536)
                    r(rd, n_)
                    c(fd)
            out.append((time.perf_counter_ns() - t0) / 100 / 1000)
    finally:
        if holder is not None:
            c(holder)
        if pipe is not None:
            c(pipe[0]), c(pipe[1])
    return out


# --- pinning -----------------------------------------------------------------------
def pin_cpus() -> tuple[int, int | None]:
    """(the reader's CPU, another CPU for the server or None): the last CPU we
    may run on, and the first other one (CPU 0 takes most interrupts)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[-1], (allowed[0] if len(allowed) > 1 else None)


def threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def affinity(pid: int) -> dict[int, set[int]]:
    """{tid: CPUs} of every thread of pid (to put back afterwards)."""
    out = {}
    for t in threads(pid):
        try:
            out[t] = os.sched_getaffinity(t)
        except ProcessLookupError:
            pass
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of pid on `cpus`: os.sched_setaffinity(pid) alone moves only
    the main thread (the file server's FUSE loop; lxcfs has worker threads, and
    threads started later inherit their creator's mask)."""
    for t in threads(pid):
        try:
            os.sched_setaffinity(t, cpus)
        except (ProcessLookupError, OSError):
            pass


def unpin(pid: int, before: dict[int, set[int]], default: set[int]) -> None:
    for t in threads(pid):
        try:
            os.sched_setaffinity(t, before.get(t, default))
        except (ProcessLookupError, OSError):
            pass


# --- tether --------------------------------------------------------------------------
def setup_tether(d: Daemon, links: int) -> str:
    d.start_container("web", ["sleep", "1000000"])
    for i in range(links):
        d.cli("link", "add", "web", f"db{i}", "--alias", f"database-{i}")
        d.start_container(f"db{i}", ["sleep", "1000000"], "--expose", "5432")
    return str(d.run_dir / "fs" / "web" / "hosts")


def measure(reads: int, links: int, rootfs: Path, tmp: Path,
            extra: dict[str, tuple[str, int | None]] | None = None,
            pinning: bool = True) -> tuple[dict[str, list[float]], int, dict]:
    """({key: µs per read}, size of the hosts file, {"reader_cpu", "other_cpu", "fsd_pid"}).

    Keys: "tmpfs", "tether", each `extra` name (unpinned), and with `pinning`
    "tmpfs pinned" and "<name> same CPU" / "<name> other CPU" for tether and
    every extra whose server pid is given. `extra` is {name: (path, server
    pid or None)}, e.g. an LXCFS file. The same bytes are read from a tmpfs
    and from tether's served file; all runs are interleaved in 10 blocks
    (their order rotating). Checks that a change shows on the next read."""
    tmpfs = tmp / "read-hosts-tmpfs"
    tmpfs.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", str(tmpfs))
    home = os.sched_getaffinity(0)
    reader, other = pin_cpus()
    saved: dict[int, dict[int, set[int]]] = {}
    try:
        with Daemon(rootfs) as d:
            d.start()
            served = setup_tether(d, links)
            data = Path(served).read_bytes()
            (tmpfs / "hosts").write_bytes(data)
            fsd = d.pid_of("fsd")
            servers = {"tether": (served, fsd), **(extra or {})}
            for _, pid in servers.values():
                if pid is not None:
                    saved[pid] = affinity(pid)
            # (key, path, reader's CPUs or None, (server pid, its CPUs or None) or None, how)
            runs: list[tuple[str, str, set[int] | None, tuple[int, set[int] | None] | None, str]] = [
                ("tmpfs", str(tmpfs / "hosts"), None, None, "read"),
                ("tmpfs sendfile", str(tmpfs / "hosts"), None, None, "sendfile")]
            if pinning:
                runs.append(("tmpfs pinned", str(tmpfs / "hosts"), {reader}, None, "read"))
            for name, (path, pid) in servers.items():
                runs.append((name, path, None, None if pid is None else (pid, None), "read"))
                if name == "tether":  # another descriptor holding it open; busybox cat's sendfile
                    runs.append(("tether held", path, None, (pid, None), "held"))
                    runs.append(("tether sendfile", path, None, (pid, None), "sendfile"))
                if pinning and pid is not None:
                    runs.append((f"{name} same CPU", path, {reader}, (pid, {reader}), "read"))
                    if other is not None:
                        runs.append((f"{name} other CPU", path, {reader}, (pid, {other}), "read"))
            res: dict[str, list[float]] = {k: [] for k, *_ in runs}
            for b in range(10):  # interleaved blocks, each starting one run later
                for k, p, rcpus, srv, how in runs[b % len(runs):] + runs[:b % len(runs)]:
                    os.sched_setaffinity(0, rcpus or home)
                    if srv is not None:
                        pid, scpus = srv
                        if scpus is None:
                            unpin(pid, saved[pid], home)
                        else:
                            pin(pid, scpus)
                    per_read_us(p, WARMUP, how)
                    res[k] += per_read_us(p, reads // 10, how)
            os.sched_setaffinity(0, home)
            for pid in saved:
                unpin(pid, saved[pid], home)
            assert d.pid_of("fsd") == fsd, f"the file server was restarted ({fsd} -> {d.pid_of('fsd')})"
            # freshness: a change shows on the very next read, held open or not
            holder = os.open(served, os.O_RDONLY)
            try:
                before = Path(served).read_bytes()
                d.cli("link", "retarget", "web", "database-0", "db1")
                after = Path(served).read_bytes()
                assert before != after and b"database-0 db1" in after, "stale read"
                assert os.pread(holder, 65536, 0) == after, "the held descriptor's next pass is stale"
            finally:
                os.close(holder)
    finally:
        os.sched_setaffinity(0, home)
        for pid, aff in saved.items():  # extras outlive us (the daemon is gone)
            unpin(pid, aff, home)
        sh("umount", str(tmpfs), check=False)
        tmpfs.rmdir()
    return res, len(data), {"reader_cpu": reader, "other_cpu": other, "fsd_pid": fsd}


def ratio(res: dict[str, list[float]], a: str, b: str) -> float | None:
    if a not in res or b not in res:
        return None
    return statistics.median(res[a]) / statistics.median(res[b])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--links", type=int, default=12)
    ap.add_argument("--no-pin", action="store_true", help="only the unpinned runs")
    ap.add_argument("--no-lxcfs", action="store_true", help="do not read an LXCFS file")
    a = ap.parse_args(argv)
    from bench import peers

    tmp = mkdtemp()
    lx = None
    try:
        extra = {}
        if not a.no_lxcfs and peers.available()["lxcfs"]:
            lx = peers.Lxcfs(tmp)
            lx.start()
            extra["lxcfs"] = (lx.uptime, lx.proc.pid)
        res, size, info = measure(a.reads, a.links, build_rootfs(tmp / "rootfs"), tmp, extra, not a.no_pin)
    finally:
        if lx:
            lx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    pinned = "" if a.no_pin else f"; pinned: the reader on CPU {info['reader_cpu']}, the server on it or on CPU {info['other_cpu']}"
    print(f"open+read+close of a {size}-byte hosts file, {a.reads} reads each (µs){pinned}")
    print(f"{'file':18} {'median':>8} {'p90':>8}")
    for k, xs in res.items():
        print(f"{k:18} {statistics.median(xs):8.2f} {pct(xs, 0.9):8.2f}")
    for a_, b_, goal in (("tether", "tmpfs", None), ("tether held", "tether", None),
                         ("tether sendfile", "tmpfs sendfile", None), ("tether same CPU", "tmpfs pinned", 4.0),
                         ("tether other CPU", "tmpfs pinned", None), ("tether", "lxcfs", 0.15)):
        x = ratio(res, a_, b_)
        if x is not None:
            print(f"ratio {a_}/{b_} (median): {x:.3f}" + ("" if goal is None else f"  (goal ≤ {goal:g}: "
                                                             f"{'met' if x <= goal else 'NOT met'})"))
    if "lxcfs" not in res and not a.no_lxcfs:
        print("LXCFS is not installed (`make bench-deps`): no LXCFS rows")
    print("freshness: a retarget showed on the next read, and on a held descriptor's next pass: yes")


if __name__ == "__main__":
    main()
