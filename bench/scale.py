"""1000 registered containers: tether-fused's memory and served-file latency.

    .venv/bin/python -m bench.scale [--containers 1000] [--reads 20000] [--parallel 8]

One isolated tether-fused (a /22 subnet). First one runc container (busybox
`sleep`) is started and measured: the daemon's RSS (VmRSS) and open+read+close
of that container's served hosts file (and, interleaved with it, a tmpfs copy
of the same bytes, to show machine drift). Then the other containers are
started, `--parallel` at a time, and the same is measured again; then they
are stopped and removed (`tether rm`) and the reads are measured a third
time, with one container again: the ratio is against the first and the third
together, so drift along the run cancels. Prints all three,
the ratios, and the daemon's own time to register one more container
(5 sequential starts of a probe container, each stopped and removed). Every container is killed and deleted (in parallel) at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from bench.read_hosts import per_read_us  # noqa: E402
from harness import build_rootfs, sh  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402
from fused.protocol import request  # noqa: E402


def vm_kb(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def bundle_like(d: Daemon, template: dict, name: str) -> Path:
    """A bundle for `name` from one patched by `tether oci patch` (what the CLI
    would write, without starting the CLI a thousand times)."""
    spec = json.loads(json.dumps(template))
    old = template["annotations"]["io.tether.name"]
    src_old = str(d.run_dir / "fs" / old)
    spec["annotations"]["io.tether.name"] = name
    spec["hostname"] = name
    spec["linux"]["cgroupsPath"] = f"/tether-test-{d.tag}-{name}"
    for m in spec["mounts"]:
        if m.get("source", "") == src_old or m.get("source", "").startswith(src_old + "/"):
            m["source"] = str(d.run_dir / "fs" / name) + m["source"][len(src_old):]
    b = d.dir / "bundles" / name
    b.mkdir(parents=True, exist_ok=True)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def teardown(d: Daemon, ids: list[str], parallel: int) -> None:
    """Kill every container, then delete them (runs their poststop hooks)."""
    with ThreadPoolExecutor(parallel) as ex:
        list(ex.map(lambda c: d.runc("kill", c, "KILL", check=False), ids))
        list(ex.map(lambda c: d.runc("delete", "-f", c, check=False), ids))
    d.containers.difference_update(ids)


def reads(paths: dict[str, str], n: int, gap: float = 0.5) -> dict[str, list[float]]:
    """Interleaved blocks, spread over ~5 s: a burst of noise on this shared
    machine (it comes and goes for about a second) cannot move the median."""
    res: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(10):
        if i:
            time.sleep(gap)
        for k, p in paths.items():
            res[k] += per_read_us(p, n // 10)
    return res


def measure(n: int, rootfs: Path, tmp: Path, n_reads: int = 20000, parallel: int = 8, log=print,
            again: bool = True, driver: str = "auto") -> dict:
    """{"rss_kb": {1: kb, n: kb, "1 after": kb}, "hwm_kb": ..., "read_us": {1: [...], n: [...],
    "1 after": [...]}, "tmpfs_us": ..., "reg_ms": {1: [...], n: [...]}, "start_s": s,
    "teardown_s": s (stop + delete of n - 1 containers), "n": n, "bytes": size}.
    Without `again`, no third measurement (and no "1 after" keys)."""
    out: dict = {"rss_kb": {}, "hwm_kb": {}, "read_us": {}, "tmpfs_us": {}, "reg_ms": {}}
    tmpfs = tmp / "scale-tmpfs"
    tmpfs.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", str(tmpfs))
    try:
        with Daemon(rootfs, prefix=22, ports=10, driver=driver) as d:
            d.start()
            b0 = d.bundle("s0", ["sleep", "1000000"])
            template = json.loads((b0 / "config.json").read_text())
            d.run("s0", b0)
            hosts = str(d.run_dir / "fs" / "s0" / "hosts")
            data = Path(hosts).read_bytes()
            (tmpfs / "hosts").write_bytes(data)
            paths = {"tether": hosts, "tmpfs": str(tmpfs / "hosts")}

            def probe(k: int, runs: int = 5) -> None:
                """Sequential registrations of one more container, the daemon's own time."""
                bp = bundle_like(d, template, "probe")
                for _ in range(runs):
                    d.run("probe", bp)
                    d.kill("probe")
                    d.cli("rm", "probe")
                lines = [line for line in d.log.read_text().splitlines() if "registered probe " in line][-runs:]
                out["reg_ms"][k] = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in lines]
                # the daemon's steps (plan, wire, firewall, store, publish), as its log gives them
                out.setdefault("reg_steps", {})[k] = [line.rsplit(" ms (", 1)[-1].rstrip(")") for line in lines]

            def snapshot(k, with_probe: bool = True) -> None:
                if with_probe:
                    probe(k)
                time.sleep(1)  # let the daemon settle (publishing, veth clean-up)
                r = reads(paths, n_reads)
                out["read_us"][k], out["tmpfs_us"][k] = r["tether"], r["tmpfs"]
                out["rss_kb"][k] = vm_kb(d.proc.pid)
                out["hwm_kb"][k] = vm_kb(d.proc.pid, "VmHWM")

            snapshot(1)
            names = [f"s{i}" for i in range(1, n)]
            live = ["s0"]
            t0 = time.perf_counter()
            done = [0]

            def start(name: str) -> None:
                live.append(name)
                d.run(name, bundle_like(d, template, name))
                done[0] += 1
                if done[0] % 200 == 0:
                    log(f"  scale: {done[0] + 1}/{n} containers running ({time.perf_counter() - t0:.0f} s)")

            try:
                with ThreadPoolExecutor(parallel) as ex:
                    list(ex.map(start, names))
                out["start_s"] = time.perf_counter() - t0
                running = sum(1 for c in d.cli_json("ps") if c["state"] == "running")
                assert running == n, f"{running} of {n} containers registered"
                assert Path(hosts).read_bytes() == data, "s0's hosts file changed"
                snapshot(n)
                # stop and delete the others
                t1 = time.perf_counter()
                teardown(d, names, parallel)
                live[:] = ["s0"]
                out["teardown_s"] = time.perf_counter() - t1
                if again:
                    # back to one registered container, and measure again: with
                    # the first, this cancels drift along the run
                    for name in names:
                        request(str(d.sock), "rm", {"name": name})
                    assert [c["name"] for c in d.cli_json("ps", "-a")] == ["s0"], "containers left registered"
                    snapshot("1 after", with_probe=False)
            finally:
                teardown(d, live, parallel)
    finally:
        sh("umount", str(tmpfs), check=False)
        tmpfs.rmdir()
    out["n"], out["bytes"] = n, len(data)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--once", action="store_true", help="skip the third measurement (1 container again)")
    ap.add_argument("--driver", choices=("auto", "nftables", "iptables"), default="auto")
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    try:
        r = measure(a.containers, build_rootfs(tmp / "rootfs"), tmp, a.reads, a.parallel, again=not a.once, driver=a.driver)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = r["n"]
    again = ", then 1 again" if "1 after" in r["read_us"] else ""
    print(f"tether-fused with 1, then {n}{again} registered containers "
          f"(started in {r['start_s']:.0f} s, stopped and deleted in {r['teardown_s']:.0f} s)")
    print(f"{'':36} {'1':>13} {n:>13} {'1 again' if again else '':>13} {'ratio':>6}")
    cols = (1, n, "1 after") if "1 after" in r["read_us"] else (1, n)
    rss = [r["rss_kb"][k] / 1024 for k in cols] + [float("nan")] * (3 - len(cols))
    print(f"{'daemon RSS (MiB)':36} {rss[0]:13.1f} {rss[1]:13.1f} {rss[2]:13.1f} {rss[1] / rss[0]:6.2f}")
    for k, label in (("read_us", f"hosts read, {r['bytes']} B (µs)"), ("tmpfs_us", "tmpfs copy, same bytes (µs)")):
        cells = [f"{statistics.median(r[k][j]):5.1f} / {pct(r[k][j], .9):5.1f}" for j in cols] + ["-"] * (3 - len(cols))
        base = statistics.median(r[k][1] + r[k].get("1 after", []))
        print(f"{label + ' med/p90':36} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {statistics.median(r[k][n]) / base:6.2f}")
    m1, mn = statistics.median(r["reg_ms"][1]), statistics.median(r["reg_ms"][n])
    print(f"{'one more registration (ms, daemon)':36} {m1:13.1f} {mn:13.1f} {'':>13} {mn / m1:6.2f}")
    for k in (1, n):
        for steps in r.get("reg_steps", {}).get(k, []):
            print(f"  registration at {k}: {steps}")


if __name__ == "__main__":
    main()
