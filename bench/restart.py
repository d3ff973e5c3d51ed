"""tether-fused's restart: from its exec until it answers, at 1 and at N
registered running containers.

    .venv/bin/python -m bench.restart [--containers 1000] [--runs 10] [--log]

Two isolated daemons side by side, one with 1 running container, one with N.
Each restart is SIGTERM (what `systemctl restart` and an upgrade send), then
exec of tether-fused, and two clocks from the exec: until the control socket
answers `ps` (what the hook and the CLI wait for) and until the DNS responder
answers a container's query for its own name (from inside that container's
network namespace, a query every 5 ms from before the SIGTERM on: the
longest time without an answer is reported too). The two daemons' restarts alternate,
so drift of this shared machine hits both. The daemon's own log stamps split
each start: until its first line (the interpreter and its imports), until
the served files are taken over, and until ready (between the two: the store
opened, reconcile of veths, addresses and firewall, every name's files
published).

The containers are stand-ins, made cheaply: `unshare --net sleep` processes,
each registered with the request the createRuntime hook sends (the files it
answers with are for the hook to mount: nothing mounts them here). A start
treats them as it treats runc's: the process and its network namespace are
alive, its veth and addresses are checked, its firewall rules and files made.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import dns.message
import dns.rcode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from bench.track import Daemon, mkdtemp, started  # noqa: E402
from harness import FUSED, build_rootfs, enter_netns  # noqa: E402
from fused.protocol import DaemonError, Unreachable, request  # noqa: E402

DEADLINE = 60.0  # s: a start that takes longer is a failure of the benchmark
PROBE_EVERY = 0.005  # s between DNS queries: 200/s, within the per-source budget
# the daemon's log lines that end each phase of a start, in order
PHASES = (("served files", "files taken over"), ("tether-fused ready", "ready"))


class StandIns:
    """N registered running containers: `unshare --net sleep` processes."""

    def __init__(self, d: Daemon, n: int) -> None:
        self.d = d
        self.procs: list[subprocess.Popen] = []
        bundle = d.dir / "standin"
        bundle.mkdir()
        # the daemon answers with the files for the hook to mount; nobody mounts them
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": str(d.rootfs)}}))
        self.bundle = bundle
        self.names: list[str] = []
        for i in range(n):
            self.add(f"r{i}")

    def add(self, name: str) -> None:
        p = subprocess.Popen(["unshare", "--net", "sleep", "1000000"], stdin=subprocess.DEVNULL)
        started(p.pid)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink("/proc/self/ns/net"):  # unshare has not exec'd yet
            if time.monotonic() > deadline:
                raise AssertionError(f"unshare {p.pid} did not enter a network namespace")
            time.sleep(0.001)
        state = {"ociVersion": "1.0.2", "id": name, "status": "creating", "pid": p.pid, "bundle": str(self.bundle),
                 "annotations": {"io.tether.name": name}}
        request(str(self.d.sock), "register", {"state_json": json.dumps(state), "ppid": 0})
        self.names.append(name)

    @property
    def first_pid(self) -> int:
        return self.procs[0].pid

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()


def dns_query(name: str) -> bytes:
    return dns.message.make_query(name + ".", "A", id=0x7e7e).to_wire()


def dns_answers(wire: bytes, name: str) -> bool:
    try:
        m = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - anything not an answer
        return False
    return m.id == 0x7e7e and m.rcode() == dns.rcode.NOERROR and any(r.name.to_text() == name + "." for r in m.answer)


class DnsProbe:
    """From a container's network namespace, a query for its own name every
    PROBE_EVERY s, on a thread of its own: when each was answered."""

    def __init__(self, pid: int, gateway: str, name: str) -> None:
        self.answered: list[float] = []  # perf_counter() of each answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid, gateway, name), daemon=True)
        self._thread.start()

    def _run(self, pid: int, gateway: str, name: str) -> None:
        enter_netns(pid)
        wire = dns_query(name)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(PROBE_EVERY)
            s.connect((gateway, 53))
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    s.send(wire)
                    while not dns_answers(s.recv(4096), name):  # a late answer to an earlier query is as good
                        pass
                    self.answered.append(time.perf_counter())
                except (TimeoutError, ConnectionRefusedError):  # nobody answers (an ICMP port unreachable)
                    pass
                self._stop.wait(max(0.0, PROBE_EVERY - (time.perf_counter() - t)))

    def first_after(self, t: float, deadline: float) -> float | None:
        while time.perf_counter() < deadline:
            later = [a for a in self.answered if a >= t]
            if later:
                return later[0]
            time.sleep(PROBE_EVERY)
        return None

    def longest_silence(self, since: float) -> float:
        """The longest time without an answer from `since` on."""
        times = [since] + [a for a in self.answered if a > since]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def stamps(log_text: str, since: float) -> dict[str, float]:
    """Seconds from `since` (epoch) to the daemon's first log line and to
    each phase's line (PHASES), from this start's lines of its log."""
    out: dict[str, float] = {}
    for line in log_text.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) tether", line)
        if not m:
            continue
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if at < since - 0.001:
            continue
        out.setdefault("first line", at - since)
        for marker, label in PHASES:
            if marker in line:
                out.setdefault(label, at - since)
    return out


def restart(d: Daemon, name: str, pid: int) -> dict[str, float]:
    """SIGTERM, then exec tether-fused: seconds from the exec until `ps` is
    answered ("ps"), until DNS answers ("dns"), the log's phases (PHASES), how
    long the stop took ("stop") and the longest time DNS did not answer, from
    the SIGTERM on ("dns silent")."""
    probe = DnsProbe(pid, d.gateway, name)
    try:
        if probe.first_after(time.perf_counter(), time.perf_counter() + DEADLINE) is None:
            raise AssertionError(f"DNS does not answer {name} before the restart")
        s0 = time.perf_counter()
        d.stop()
        stop = time.perf_counter() - s0
        log_from = len(d.log.read_bytes())
        t0 = time.perf_counter()
        wall0 = time.time()
        deadline = t0 + DEADLINE
        logf = open(d.log, "a")
        d.proc = subprocess.Popen([FUSED, "--config", str(d.config)], stdout=logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        logf.close()
        started(d.proc.pid)
        d.pids.add(d.proc.pid)
        while True:
            try:
                request(str(d.sock), "ps", timeout=DEADLINE)
                break
            except (Unreachable, DaemonError):
                if time.perf_counter() > deadline or d.proc.poll() is not None:
                    raise AssertionError(f"tether-fused did not answer:\n{d.log.read_text()[-3000:]}") from None
                time.sleep(0.001)
        ps = time.perf_counter() - t0
        answered = probe.first_after(t0, deadline)
        if answered is None:
            raise AssertionError(f"DNS did not answer {name} within {DEADLINE:g} s of the start")
        silent = probe.longest_silence(s0)
    finally:
        probe.close()
    text = d.log.read_bytes()[log_from:].decode(errors="replace")
    return {"ps": ps, "dns": answered - t0, "dns silent": silent, "stop": stop, **stamps(text, wall0)}


def measure(rootfs: Path, sizes: tuple[int, ...] = (1, 1000), runs: int = 10, log=print) -> dict:
    """{str(N): {"ps": [s...], "dns": [...], "stop": [...], "first line": [...], ...}}"""
    daemons, standins = {}, {}
    try:
        for n in sizes:
            # a /22 for 1000 addresses; each daemon its own bridge, subnets and chains
            d = Daemon(rootfs, prefix=22 if n > 200 else 24, ports=10, strategy="facade")
            daemons[n] = d
            d.start()
            t = time.perf_counter()
            standins[n] = StandIns(d, n)
            log(f"  restart: {n} container(s) registered in {time.perf_counter() - t:.0f} s")
        out: dict[str, dict[str, list[float]]] = {str(n): {} for n in sizes}
        for i in range(runs):
            for n in sizes:  # alternate: drift of the machine hits every size alike
                r = restart(daemons[n], standins[n].names[0], standins[n].first_pid)
                for k, v in r.items():
                    out[str(n)].setdefault(k, []).append(v)
                running = sum(1 for c in request(str(daemons[n].sock), "ps") if c["state"] == "running")
                assert running == n, f"after a restart, {running} of {n} containers are running"
        return out
    finally:
        for n, d in daemons.items():
            if n in standins:
                standins[n].close()
            d.close()


def table(r: dict) -> str:
    sizes = sorted(r, key=int)
    keys = ["ps", "dns", "dns silent", "first line", *(label for _, label in PHASES), "stop"]
    labels = {"ps": "exec until `ps` is answered", "dns": "exec until DNS answers",
              "dns silent": "longest time DNS did not answer", "first line":
              "  log: first line (interpreter, imports)", "files taken over": "  log: served files taken over",
              "ready": "  log: ready (store, reconcile, publish)",
              "stop": "SIGTERM until it exited"}
    lines = [f"{'ms, median / p90':42}" + "".join(f"{f'{n} container' + ('s' if n != '1' else ''):>20}" for n in sizes)]
    for k in keys:
        cells = [f"{statistics.median(r[n][k]) * 1000:.0f} / {pct(r[n][k], .9) * 1000:.0f}" if r[n].get(k) else "-"
                 for n in sizes]
        lines.append(f"{labels[k]:42}" + "".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("python -m bench.restart: run as root")
    tmp = mkdtemp()
    try:
        r = measure(build_rootfs(tmp / "rootfs"), (1, a.containers), a.runs, log=lambda m: print(m, file=sys.stderr))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tether-fused restart (SIGTERM, exec), {a.runs} runs per size, sizes alternating")
    print(table(r))


if __name__ == "__main__":
    main()
