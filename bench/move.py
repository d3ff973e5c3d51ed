"""`tether move` at 1, 10, 100 and 1000 links: how long until consumers see it.

    .venv/bin/python -m bench.move [--runs 10] [--sizes 1,10,100,1000]

For each size, an isolated tether-fused (facade strategy) with targets t1 and
t2 (TCP 5432 answers the name) and consumers whose links all point at t1;
then `move` back and forth. Measured from the call to:
  api     the control request returning (store txn, firewall commit, publish)
  files   a consumer's served hosts file naming the new target
  tcp     a new TCP connection from inside a consumer's network namespace to
          its alias's facade address answered by the new target
Medians and p90 in ms. All traffic stays inside the benchmark's containers.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import build_rootfs, enter_netns, serve  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402
from fused.protocol import request  # noqa: E402




class Prober(threading.Thread):
    """Connects from a consumer's netns to `addr`:5432 until it answers `want`."""

    def __init__(self, pid: int, addr: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.addr = pid, addr
        self.want: str | None = None
        self.t0 = 0.0
        self.hit = threading.Event()
        self.result = 0.0
        self.go = threading.Event()
        self.stop = False

    def run(self) -> None:
        enter_netns(self.pid)
        while not self.stop:
            self.go.wait()
            if self.stop:
                return
            while True:
                try:
                    with socket.create_connection((self.addr, 5432), timeout=1) as s:
                        got = s.recv(100).decode().strip()
                    if got == self.want:
                        self.result = time.perf_counter() - self.t0
                        break
                except OSError:
                    pass
            self.go.clear()
            self.hit.set()


def measure(rootfs: Path, links: int, runs: int, driver: str = "auto") -> dict[str, list[float]]:
    per = min(links, 100)
    consumers = max(1, links // per)
    with Daemon(rootfs, strategy="facade", driver=driver) as d:
        d.start()
        d.start_container("t1", serve("t1"), "--expose", "5432")
        d.start_container("t2", serve("t2"), "--expose", "5432")
        for c in range(consumers):
            args = [a for i in range(per) for a in ("--link", f"t1:s{i}")]
            d.start_container(f"c{c}", ["sleep", "1000000"], *args)
        hosts = d.run_dir / "fs" / "c0" / "hosts"
        facade = next(line.split("\t")[0] for line in hosts.read_text().splitlines() if "\ts0 " in line)
        prober = Prober(d.container("c0")["pid"], facade)
        prober.start()
        out: dict[str, list[float]] = {"api": [], "files": [], "tcp": []}
        old, new = "t1", "t2"
        for _ in range(runs):
            prober.want, prober.hit = new, threading.Event()
            t0 = time.perf_counter()
            prober.t0 = t0
            prober.go.set()
            request(str(d.sock), "move", {"old": old, "new": new})
            out["api"].append(time.perf_counter() - t0)
            while f"s0 {new}\n" not in hosts.read_text():
                pass
            out["files"].append(time.perf_counter() - t0)
            prober.hit.wait(10)
            out["tcp"].append(prober.result)
            old, new = new, old
        prober.stop = True
        prober.go.set()
    return {k: [v * 1000 for v in vs] for k, vs in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--driver", default="auto", choices=("auto", "nftables", "iptables"))
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    rootfs = build_rootfs(tmp / "rootfs")
    rows = []
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            rows.append((n, measure(rootfs, n, a.runs, a.driver)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tether move ({a.driver}), {a.runs} moves per size (ms): median / p90")
    print(f"{'links':>6} {'api':>15} {'files':>15} {'new tcp':>15}")
    for n, r in rows:
        cells = [f"{statistics.median(r[k]):6.1f} /{pct(r[k], 0.9):6.1f}" for k in ("api", "files", "tcp")]
        print(f"{n:>6} " + " ".join(f"{c:>15}" for c in cells))
    by = dict(rows)
    if 10 in by and 1000 in by:
        ratio = statistics.median(by[1000]["tcp"]) / statistics.median(by[10]["tcp"])
        print(f"cost at 1000 links / cost at 10 (new tcp, median): {ratio:.2f}")


if __name__ == "__main__":
    main()
