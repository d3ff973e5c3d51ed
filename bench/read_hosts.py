"""Read a ~500-byte hosts file (open, read, close) from tmpfs and from tether.

    .venv/bin/python -m bench.read_hosts [--reads 20000] [--links 12]

One run, interleaved in blocks so machine drift cancels; prints medians, p90
and the ratio. The tether file is served by an isolated tether-fused whose
link graph is filled through the control socket (no containers needed: a
link's consumer is a registered name, here registered by a real runc
container).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import Daemon, build_rootfs, sh  # noqa: E402


def per_read_us(path: str, n: int) -> list[float]:
    """n timings (µs) of open+read+close, in blocks of 100 to keep clock overhead low."""
    out = []
    o, r, c = os.open, os.read, os.close
    flags = os.O_RDONLY
    for _ in range(n // 100):
        t0 = time.perf_counter_ns()
        for _ in range(100):
            fd = o(path, flags)
            r(fd, 65536)
            c(fd)
        out.append((time.perf_counter_ns() - t0) / 100 / 1000)
    return out



def setup_tether(d: Daemon, links: int) -> str:
    d.start_container("web", ["sleep", "1000000"])
    for i in range(links):
        d.cli("link", "add", "web", f"db{i}", "--alias", f"database-{i}")
        d.start_container(f"db{i}", ["sleep", "1000000"], "--expose", "5432")
    return str(d.run_dir / "fs" / "web" / "hosts")


def measure(reads: int, links: int, rootfs: Path, tmp: Path,
            extra: dict[str, str] | None = None) -> tuple[dict[str, list[float]], int]:
    """({"tmpfs"|"tether"|extra name: µs per read}, size of the hosts file).

    The same bytes are read from a tmpfs and from tether's served file; `extra`
    paths (e.g. an LXCFS file) are read the same way. All interleaved in 10
    blocks. Checks that a change shows on the next read."""
    tmpfs = tmp / "read-hosts-tmpfs"
    tmpfs.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", str(tmpfs))
    try:
        with Daemon(rootfs) as d:
            d.start()
            served = setup_tether(d, links)
            data = Path(served).read_bytes()
            (tmpfs / "hosts").write_bytes(data)
            paths = {"tmpfs": str(tmpfs / "hosts"), "tether": served, **(extra or {})}
            res: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(10):  # interleaved blocks
                for k, p in paths.items():
                    res[k] += per_read_us(p, reads // 10)
            # freshness: a change shows on the very next read
            before = Path(served).read_bytes()
            d.cli("link", "retarget", "web", "database-0", "db1")
            after = Path(served).read_bytes()
            assert before != after and b"database-0 db1" in after, "stale read"
    finally:
        sh("umount", str(tmpfs), check=False)
        tmpfs.rmdir()
    return res, len(data)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--links", type=int, default=12)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    res, size = measure(a.reads, a.links, build_rootfs(tmp / "rootfs"), tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"open+read+close of a {size}-byte hosts file, {a.reads} reads each (µs)")
    print(f"{'file':10} {'median':>8} {'p90':>8}")
    for k, xs in res.items():
        print(f"{k:10} {statistics.median(xs):8.2f} {pct(xs, 0.9):8.2f}")
    print(f"ratio tether/tmpfs (median): {statistics.median(res['tether']) / statistics.median(res['tmpfs']):.2f}")
    print("freshness: a retarget showed on the next read: yes")


if __name__ == "__main__":
    main()
