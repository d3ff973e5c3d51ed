"""Several hosts ([store] backend = "etcd"): what the shared store costs.

    .venv/bin/python -m bench.cluster [--runs 30] [--per-host 50]

Hosts are network namespaces with their own tether-fused, joined by an
underlay bridge, with a throwaway etcd on it (tests/integration/cluster.py).
  register     one container's registration (the daemon's own time, from its
               log), etcd store against SQLite, on the same kind of host,
               runs interleaved
  propagation  `tether move` on host h1 until the served hosts file of a
               consumer on host h2 names the new target
  contention   3 hosts starting `--per-host` containers each at once: starts
               per second, and how many commits were planned again
Medians and p90 in ms. All traffic stays inside the benchmark's namespaces.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from bench.track import mkdtemp  # noqa: E402
from cluster import Cluster, Underlay  # noqa: E402
from fused.protocol import request  # noqa: E402
from harness import Daemon, build_rootfs, serve  # noqa: E402

SLEEP = ["sleep", "1000000"]


def _registered_ms(log: str, name: str) -> float:
    m = re.findall(rf"registered {re.escape(name)} \(id .*?\) at \S+ in ([0-9.]+) ms", log)
    return float(m[-1])


def register(rootfs: Path, runs: int) -> dict[str, list[float]]:
    """The daemon's registration time, SQLite and etcd, starts interleaved."""
    out: dict[str, list[float]] = {"sqlite": [], "etcd": []}
    net = Underlay()
    ns, _ = net.host("solo")
    solo = Daemon(rootfs, strategy="facade", driver="auto", netns=ns)
    try:
        with Cluster(rootfs, n=1, strategy="facade", driver="auto") as c:
            solo.start()
            c.start()
            for d in (solo, c["h1"]):  # a first start of each warms it
                d.start_container("warm", SLEEP)
                d.kill("warm")
            for i in range(runs):
                for kind, d in (("sqlite", solo), ("etcd", c["h1"])):
                    name = f"p{i}"
                    d.start_container(name, SLEEP)
                    out[kind].append(_registered_ms(d.log.read_text(), name))
                    d.kill(name)
    finally:
        solo.close()
        net.close()
    return out


def propagation(rootfs: Path, runs: int) -> list[float]:
    out = []
    with Cluster(rootfs, n=2, strategy="facade", driver="auto") as c:
        c.start()
        h1, h2 = c["h1"], c["h2"]
        h1.start_container("t1", serve("t1"), "--expose", "5432")
        h1.start_container("t2", serve("t2"), "--expose", "5432")
        h2.start_container("c", SLEEP, "--link", "t1:s0")
        hosts = h2.run_dir / "fs" / "c" / "hosts"
        old, new = "t1", "t2"
        for _ in range(runs):
            t0 = time.perf_counter()
            request(str(h1.sock), "move", {"old": old, "new": new})
            while f"s0 {new}\n" not in hosts.read_text():
                time.sleep(0.0005)
            out.append((time.perf_counter() - t0) * 1000)
            old, new = new, old
    return out


def contention(rootfs: Path, per_host: int) -> dict:
    with Cluster(rootfs, n=3, strategy="direct", driver="auto", ports=max(100, 3 * per_host + 10)) as c:
        c.start()

        def start(host: str) -> None:
            for i in range(per_host):
                c[host].start_container(f"{host}c{i}", SLEEP, "--publish", "8080")

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(start, ["h1", "h2", "h3"]))
        took = time.perf_counter() - t0
        rows = c["h1"].cli_json("ps")
        retried = sum(len(re.findall(r"attempt \d+ of", d.log.read_text())) for d in c.daemons.values())
        ips = {r["ip"] for r in rows}
        ports = {p for r in rows for p in r["published"]}
        return {"n": 3 * per_host, "seconds": took, "per_s": 3 * per_host / took, "retried": retried,
                "unique": len(ips) == len(rows) == 3 * per_host and len(ports) == 3 * per_host}


def measure(rootfs: Path, runs: int, per_host: int) -> dict:
    return {"register": register(rootfs, runs), "propagation": propagation(rootfs, runs),
            "contention": contention(rootfs, per_host)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--per-host", type=int, default=50)
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    try:
        r = measure(build_rootfs(tmp / "rootfs"), a.runs, a.per_host)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reg, prop, con = r["register"], r["propagation"], r["contention"]
    fmt = lambda xs: f"{statistics.median(xs):6.1f} / {pct(xs, 0.9):6.1f}"  # noqa: E731
    print(f"several hosts, {a.runs} runs (ms): median / p90")
    print(f"registration, SQLite store  {fmt(reg['sqlite'])}")
    print(f"registration, etcd store    {fmt(reg['etcd'])}   "
          f"({statistics.median(reg['etcd']) / statistics.median(reg['sqlite']):.2f}x SQLite)")
    print(f"a move on h1 in h2's files  {fmt(prop)}")
    print(f"{con['n']} starts on 3 hosts at once: {con['seconds']:.1f} s, {con['per_s']:.1f}/s, "
          f"{con['retried']} commits planned again, addresses and ports unique: {con['unique']}")


if __name__ == "__main__":
    main()
