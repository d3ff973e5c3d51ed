"""DNS from one container: tether-fused's responder against a reference.

    .venv/bin/python -m bench.dns [--queries 3000]

The client runs inside a container's network namespace and sends queries one
after another (UDP, dnspython wire format) to the bridge gateway: tether on
port 53, and as the reference a minimal dnspython stub server (a separate
process, plain blocking socket, fixed answers) on port 5353 of the same
address. Interleaved in blocks; prints median and p90 latency and the
queries per second of one sequential client. This machine has no local
resolver of the host's own (its resolv.conf points at an outside address the
benchmark must not use), so the stub is the reference.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dns.message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import build_rootfs, in_netns, serve  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402

STUB = r"""
import socket, sys, dns.message, dns.rrset, dns.rdatatype
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
print("ready", flush=True)
while True:
    wire, addr = s.recvfrom(4096)
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    name = q.question[0].name
    if q.question[0].rdtype == dns.rdatatype.SRV:
        r.answer.append(dns.rrset.from_text(name, 0, "IN", "SRV", "0 0 5432 database."))
        r.additional.append(dns.rrset.from_text("database.", 0, "IN", "A", "10.0.0.1"))
    else:
        r.answer.append(dns.rrset.from_text(name, 0, "IN", "A", "10.0.0.1"))
    s.sendto(r.to_wire(), addr)
"""



def run_queries(server: tuple[str, int], wires: list[bytes], n: int) -> list[float]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(server)
    out = []
    try:
        for i in range(n):
            w = wires[i % len(wires)]
            t0 = time.perf_counter()
            s.send(w)
            resp = s.recv(4096)
            out.append(time.perf_counter() - t0)
            assert resp[:2] == w[:2]
    finally:
        s.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=3000)
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    rootfs = build_rootfs(tmp / "rootfs")
    with Daemon(rootfs, strategy="facade") as d:
        d.start()
        d.start_container("db", serve("db"), "--expose", "5432")
        d.start_container("web", ["sleep", "1000000"], "--link", "db:database")
        stub = subprocess.Popen([sys.executable, "-c", STUB, d.gateway], stdout=subprocess.PIPE, text=True)
        try:
            assert stub.stdout.readline().strip() == "ready"
            pid = d.container("web")["pid"]
            kinds = {
                "A": [dns.message.make_query("database.", "A", id=i).to_wire() for i in range(1, 100)],
                "SRV": [dns.message.make_query("_database._tcp.", "SRV", id=i).to_wire() for i in range(1, 100)],
            }
            res = {(k, who): [] for k in kinds for who in ("tether", "stub")}
            block = max(1, a.queries // 10)
            for _ in range(10):
                for k, wires in kinds.items():
                    res[(k, "tether")] += in_netns(pid, run_queries, (d.gateway, 53), wires, block)
                    res[(k, "stub")] += in_netns(pid, run_queries, (d.gateway, 5353), wires, block)
        finally:
            stub.kill()
            stub.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"DNS over UDP from one container, {block * 10} sequential queries each")
    print(f"{'query':6} {'server':28} {'median µs':>10} {'p90 µs':>8} {'q/s':>8}")
    for (k, who), xs in res.items():
        name = "tether-fused (:53)" if who == "tether" else "dnspython stub (:5353)"
        med = statistics.median(xs)
        print(f"{k:6} {name:28} {med * 1e6:10.0f} {pct(xs, 0.9) * 1e6:8.0f} {len(xs) / sum(xs):8.0f}")


if __name__ == "__main__":
    main()
