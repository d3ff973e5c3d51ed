"""The proposal's retarget strategies side by side: facade, direct, veth-move, reassign.

    .venv/bin/python -m bench.strategies [--runs 6]

For each strategy, an isolated tether-fused with targets t1 and t2 and a
consumer c linked to t1. From inside c (threads of this process in c's
network namespace), a steady stream goes to the address c cached before
the move (the facade address, or t1's own address):
  - a UDP datagram every 1 ms, counted by receivers in t1's and t2's namespaces;
  - a new TCP connection every 5 ms to port 5432 (each target answers its name).
Then `tether move` back and forth. Per move:
  (a) reach    ms from the call until the first new TCP connection answered by NEW
  (b) lost     UDP datagrams sent during the move that neither target received
  (c) reached  whether the cached address reached NEW at all (direct: no, by design)
All traffic stays inside the benchmark's own containers.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import address_in_hosts, build_rootfs, enter_netns, serve  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402
from fused.protocol import request  # noqa: E402

STRATEGIES = ("facade", "direct", "veth-move", "reassign")
UDP_PORT = 9999
WINDOW = 2.0  # s of stream after each move: a strategy that never reaches NEW shows as "no"
class Counter(threading.Thread):
    """UDP receiver in a target's netns: the sequence numbers it got."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.got = pid, set()
        self.ready, self.stop = threading.Event(), False

    def run(self) -> None:
        enter_netns(self.pid)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("0.0.0.0", UDP_PORT))
            s.settimeout(0.1)
            self.ready.set()
            while not self.stop:
                try:
                    data = s.recv(64)
                except TimeoutError:
                    continue
                self.got.add(int(data))


class Stream(threading.Thread):
    """From the consumer's netns: a UDP datagram every 1 ms to `addr`, and
    (another thread) a new TCP connection every 5 ms, each on its own short
    thread so that one lost SYN does not hold the next back. Records (time,
    seq) sent and (started, answered, answer) per TCP connection."""

    def __init__(self, pid: int, addr: str) -> None:
        super().__init__(daemon=True)
        self.pid, self.addr = pid, addr
        self.sent: list[tuple[float, int]] = []
        self.tcp: list[tuple[float, float, str]] = []
        self.stop = False

    def run(self) -> None:
        tcp = threading.Thread(target=self._tcp, daemon=True)
        tcp.start()
        enter_netns(self.pid)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one source port: one tracked flow
        seq = 0
        while not self.stop:
            now = time.perf_counter()
            udp.sendto(str(seq).encode(), (self.addr, UDP_PORT))
            self.sent.append((now, seq))
            seq += 1
            time.sleep(max(0.0, 0.001 - (time.perf_counter() - now)))
        udp.close()
        tcp.join(2)

    def _tcp(self) -> None:
        enter_netns(self.pid)
        while not self.stop:
            t = time.perf_counter()
            threading.Thread(target=self._connect, args=(t,), daemon=True).start()
            time.sleep(max(0.0, 0.005 - (time.perf_counter() - t)))

    def _connect(self, started: float) -> None:
        enter_netns(self.pid)
        try:
            with socket.create_connection((self.addr, 5432), timeout=1) as s:
                who = s.recv(64).decode().strip()
        except OSError:
            who = ""
        self.tcp.append((started, time.perf_counter(), who))


def measure(rootfs: Path, strategy: str, runs: int, driver: str = "auto") -> dict:
    """{"reach_ms": [...], "lost": [...], "reached": [bool, ...]} per move."""
    out: dict = {"reach_ms": [], "lost": [], "reached": []}
    with Daemon(rootfs, strategy=strategy, driver=driver) as d:
        d.start()
        d.start_container("t1", serve("t1"), "--expose", "5432", "--expose", f"{UDP_PORT}/udp")
        d.start_container("t2", serve("t2"), "--expose", "5432", "--expose", f"{UDP_PORT}/udp")
        d.start_container("c", ["sleep", "1000000"], "--link", "t1:db")
        addr = address_in_hosts((d.run_dir / "fs" / "c" / "hosts").read_text(), "db")
        counters = {n: Counter(d.container(n)["pid"]) for n in ("t1", "t2")}
        for c in counters.values():
            c.start()
            c.ready.wait(5)
        old, new = "t1", "t2"
        for _ in range(runs):
            stream = Stream(d.container("c")["pid"], addr)
            stream.start()
            time.sleep(0.3)  # steady before the move
            for c in counters.values():
                c.got.clear()
            t0 = time.perf_counter()
            first_seq = stream.sent[-1][1] + 1 if stream.sent else 0
            request(str(d.sock), "move", {"old": old, "new": new})
            api = (time.perf_counter() - t0) * 1000
            time.sleep(WINDOW)
            stream.stop = True
            stream.join(5)
            sent = [s for t, s in stream.sent if s >= first_seq and t <= t0 + WINDOW - 0.2]
            got = counters["t1"].got | counters["t2"].got
            out["lost"].append(sum(1 for s in sent if s not in got))
            hits = sorted(done for started, done, who in stream.tcp if started > t0 and who == new)
            out["reached"].append(bool(hits))
            if hits:
                out["reach_ms"].append((hits[0] - t0) * 1000)
            out.setdefault("api_ms", []).append(api)
            old, new = new, old
        for c in counters.values():
            c.stop = True
        out["log"] = [line.split(": ", 1)[-1] for line in d.log.read_text().splitlines() if "moved " in line or "move: " in line]
    return out


def plot(results: dict, path: Path) -> None:
    """(a) and (b) per strategy, side by side: bars of the median, whiskers to p90 / max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in STRATEGIES if n in results]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, n in enumerate(names):
        m = results[n]
        if all(m["reached"]):
            y = statistics.median(m["reach_ms"])
            a1.bar(i, y, 0.6, yerr=[[0], [pct(m["reach_ms"], 0.9) - y]], capsize=4, color="tab:blue", edgecolor="black", lw=0.5)
            a1.text(i, y, f" {y:.1f}", ha="center", va="bottom", fontsize=9)
        else:
            a1.text(i, 1, "never\n(cached address\nkeeps reaching OLD)", ha="center", fontsize=8, color="grey")
        lost = statistics.median(m["lost"])
        a2.bar(i, lost, 0.6, yerr=[[0], [max(m["lost"]) - lost]], capsize=4, color="tab:orange", edgecolor="black", lw=0.5)
        a2.text(i, lost, f" {lost:.0f}", ha="center", va="bottom", fontsize=9)
    for ax in (a1, a2):
        ax.set_xticks(range(len(names)), names)
        ax.grid(axis="y", alpha=0.3)
    a1.axhline(10, ls="--", color="red", lw=1)
    a1.text(len(names) - 0.5, 10, "goal veth-move, reassign: 10 ms", color="red", fontsize=8, ha="right", va="bottom")
    a1.set_ylabel("ms (bar: median, whisker: p90)")
    a1.set_title("(a) `tether move` until a new TCP connection\nto the cached address reaches NEW")
    a2.axhline(10, ls="--", color="red", lw=1)
    a2.set_ylabel("datagrams (bar: median, whisker: max)")
    a2.set_title("(b) UDP datagrams lost (one every 1 ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--log", action="store_true", help="the daemon's log line of each move")
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    rootfs = build_rootfs(tmp / "rootfs")
    print(f"tether move, {a.runs} moves per strategy: (a) ms until a new TCP connection reaches NEW, "
          "(b) UDP datagrams lost (1 per ms), (c) NEW reached from the cached address")
    print(f"{'strategy':>10} {'(a) median / p90':>18} {'(b) median / max':>18} {'(c)':>5}")
    for s in a.strategies.split(","):
        r = measure(rootfs, s, a.runs)
        every = all(r["reached"])
        reach = f"{statistics.median(r['reach_ms']):6.1f} /{pct(r['reach_ms'], 0.9):6.1f}" if every else "never"
        lost = f"{statistics.median(r['lost']):6.0f} /{max(r['lost']):6.0f}"
        print(f"{s:>10} {reach:>18} {lost:>18} {'yes' if every else 'no':>5}   api {statistics.median(r['api_ms']):.1f} ms")
        if a.log:
            print("\n".join("    " + line for line in r["log"]))
            print(f"    per move: reach {[round(x, 1) for x in r['reach_ms']]} lost {r['lost']}")


if __name__ == "__main__":
    main()
