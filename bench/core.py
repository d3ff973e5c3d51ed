"""The daemon's own share of a request, in process: no kernel, no containers.

    .venv/bin/python -m bench.core [--sizes 1,10,100,1000] [--runs 30] [--profile register|move]

tether-fused's Service on a real SQLite store in a temporary directory, with
a kernel that only records what it is asked (the wiring, the firewall commit
and the file server are not measured; bench.scale and bench.move measure them
with real containers). For each size N:
  register  one more container's registration (and its stop) with N others
            running, each with one link to a shared target
  move      `move` of N links (N/100 consumers of 100 links each, as in
            bench.move) between two targets
Medians and p90 in ms, and the ratio to the smallest size. `--profile`
prints cProfile's top functions for that request at the largest size: where
the time goes, by name.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench import pct
from fused import service as service_mod
from fused.config import Config
from fused.net.wiring import Worker
from fused.store.sqlite import SqliteStore


class RecordingWiring:
    def __init__(self) -> None:
        self.veths: set[str] = set()

    def wire(self, ep) -> None:
        self.veths.add(ep.veth)

    def unwire(self, veth) -> None:
        self.veths.discard(veth)

    def unwire_all(self, veths) -> None:
        self.veths.difference_update(veths)

    def veth_exists(self, veth) -> bool:
        return veth in self.veths

    def cut_problem(self):
        return None

    def cut(self, filters) -> int:
        return len(filters)


class RecordingFirewall:
    def setup(self) -> None:
        pass

    def apply(self, rules) -> int:
        self.rules = rules
        return 1


class Core:
    """A Service with N containers, in a temporary state_dir."""

    def __init__(self, tmp: Path) -> None:
        self.dead: set[int] = set()
        self.pids: dict[str, int] = {}
        service_mod.netns_inode = lambda pid: None if pid in self.dead else 4026530000 + pid
        service_mod._host_netns = lambda: 1
        service_mod.host_ports.in_use = lambda port, proto: False
        (tmp / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
        self.bundle = str(tmp)
        cfg = Config(network={"subnet": "10.200.0.0/20", "facade_subnet": "10.201.0.0/16",
                              "port_range": "40000-44999", "strategy": "facade"})
        self.worker = Worker("bench-core")
        self.svc = service_mod.Service(cfg, SqliteStore(tmp / "tether.db"), RecordingWiring(), RecordingFirewall(),
                                       self.worker)
        self.pid = 1000
        self.tmp = tmp

    def close(self) -> None:
        self.worker.shutdown()
        self.svc.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def call(self, op: str, args: dict):
        return trio.run(self.svc.dispatch, op, args)

    def state(self, name: str, **ann) -> dict:
        self.pid += 1
        self.pids[name] = self.pid
        annotations = {"io.tether.name": name, **{f"io.tether.{k}": v for k, v in ann.items()}}
        return {"state_json": json.dumps({"id": name, "pid": self.pid, "bundle": self.bundle,
                                          "annotations": annotations}), "ppid": 0}

    def start(self, name: str, **ann) -> None:
        self.call("register", self.state(name, **ann))

    def stop(self, name: str) -> None:
        self.dead.add(self.pids[name])  # its process is gone, as at a real poststop
        self.call("poststop", {"state_json": json.dumps({"id": name, "pid": 0, "bundle": self.bundle}), "ppid": 0})


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def register_case(n: int, runs: int):
    """(fn timing one registration plus its stop, core)"""
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-core-"))
    core = Core(tmp)
    core.start("db", expose="5432")
    for i in range(n):
        core.start(f"c{i}", links="db:db")

    def once():
        core.start("probe", links="db:db", publish="8080")
        core.stop("probe")
    return once, core


def move_case(n: int, runs: int):
    tmp = Path(tempfile.mkdtemp(prefix="tether-bench-core-"))
    core = Core(tmp)
    core.start("t1", expose="5432")
    core.start("t2", expose="5432")
    per = min(n, 100)
    for c in range(max(1, n // per)):
        core.start(f"c{c}", links=",".join(f"t1:s{i}" for i in range(per)))
    pair = ["t1", "t2"]

    def once():
        core.call("move", {"old": pair[0], "new": pair[1]})
        pair.reverse()
    return once, core


CASES = {"register": register_case, "move": move_case}


def measure(sizes: tuple[int, ...], runs: int) -> dict[str, dict[str, list[float]]]:
    """{request: {str(N): ms per run}}, for `python -m bench`."""
    out: dict[str, dict[str, list[float]]] = {}
    for what, case in CASES.items():
        for n in sizes:
            once, core = case(n, runs)
            try:
                once()
                out.setdefault(what, {})[str(n)] = timed(once, runs)
            finally:
                core.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--profile", choices=sorted(CASES))
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"{'request':<10}{'N':>6}{'median ms':>11}{'p90 ms':>9}{'×N=' + str(sizes[0]):>9}")
    for what, case in CASES.items():
        base = None
        for n in sizes:
            once, core = case(n, a.runs)
            once()  # warm: the first publish after the set-up, caches
            xs = timed(once, a.runs)
            med = statistics.median(xs)
            base = base or med
            print(f"{what:<10}{n:>6}{med:>11.2f}{pct(xs, 90):>9.2f}{med / base:>8.2f}×")
            if a.profile == what and n == sizes[-1]:
                prof = cProfile.Profile()
                prof.runcall(lambda: [once() for _ in range(a.runs)])
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(18)
            core.close()


if __name__ == "__main__":
    main()
