"""Load on the DNS responder from inside containers: a flooder and a prober,
each a Python process of its own in one container's network namespace
(`nsenter --net=/proc/PID/ns/net`), so that neither shares a CPU's worth of
GIL with the other or with the caller. Traffic goes only to the gateway the
caller names (its own test daemon's). Used by bench.dns and by
tests/integration/test_dns_flood.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import dns.message

# sends one query as fast as it can (non-blocking), reading what comes back
# between batches; prints what it sent and the answers by rcode
FLOOD = r"""
import json, socket, sys, time
gw, seconds, wire = sys.argv[1], float(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.connect((gw, 53))
s.setblocking(False)
send, recv = s.send, s.recv
sent, rcodes = 0, [0] * 16

def drain():
    while True:
        try:
            r = recv(4096)
        except OSError:
            return
        if len(r) >= 4:
            rcodes[r[3] & 15] += 1

print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            send(wire)
            sent += 1
        except OSError:
            pass
    drain()
time.sleep(0.3)  # the answers still on their way
drain()
print(json.dumps({"sent": sent, "rcodes": rcodes, "seconds": seconds}), flush=True)
"""

# one query at a time, every `interval` s, each waiting up to `timeout` s;
# prints each query's latency in ms (None: no answer in time), when it was
# sent (s after "ready"), and the rcodes
PROBE = r"""
import json, select, socket, sys, time
gw, seconds, interval, timeout, wire = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), bytes.fromhex(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((gw, 53))
lat, rcodes, sent_at = [], [], []
print("ready", flush=True)
start = time.monotonic()
end = start + seconds
i = 0
while time.monotonic() < end:
    i = (i + 1) & 0xFFFF
    q = i.to_bytes(2, "big") + wire[2:]
    t0 = time.monotonic()
    sent_at.append(t0 - start)
    try:
        s.send(q)
    except OSError:
        pass
    got = None
    while True:
        left = t0 + timeout - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        try:
            r = s.recv(4096)
        except OSError:
            continue
        if r[:2] == q[:2]:
            got = (time.monotonic() - t0) * 1000
            rcodes.append(r[3] & 15)
            break
    lat.append(got)
    pause = t0 + interval - time.monotonic()
    if pause > 0:
        time.sleep(pause)
print(json.dumps({"lat_ms": lat, "rcodes": rcodes, "sent_at": sent_at}), flush=True)
"""


# a container burning one CPU, asking nothing: the control for what a flood
# costs the others through the CPU it takes, whatever it sends
HOG = r"""
import sys, time
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    n += 1
print('{"loops": %d}' % n, flush=True)
"""


def query_hex(name: str = "database.", rdtype: str = "A") -> str:
    return dns.message.make_query(name, rdtype, id=1).to_wire().hex()


class Load:
    """One of the scripts above, running in the network namespace of `pid`."""

    def __init__(self, pid: int, script: str, *args) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable, "-c", script, *map(str, args)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"load generator did not start: {line!r}")

    def result(self, timeout: float = 120) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def flood(pid: int, gateway: str, seconds: float, wire_hex: str | None = None) -> Load:
    return Load(pid, FLOOD, gateway, seconds, wire_hex or query_hex())


def hog(pid: int, seconds: float) -> Load:
    return Load(pid, HOG, seconds)


def probe(pid: int, gateway: str, seconds: float, interval: float = 0.01, timeout: float = 1.0,
          wire_hex: str | None = None) -> Load:
    return Load(pid, PROBE, gateway, seconds, interval, timeout, wire_hex or query_hex())
