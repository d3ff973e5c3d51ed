"""`runc run` of a trivial container: no hook, a `python3 -c pass` hook, tether.

    .venv/bin/python -m bench.runc_hook [--runs 30]

Interleaves the variants so machine drift cancels, prints median and p90 in
ms. Uses an isolated tether-fused (own bridge, subnet, chains) and removes
everything it made.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct  # noqa: E402
from harness import build_rootfs  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402



def timed_run(d: Daemon, cid: str, bundle: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["runc", "--root", str(d.runc_root), "run", "--bundle", str(bundle), cid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    dt = time.perf_counter() - t0
    d.runc("delete", "-f", cid, check=False)
    return dt * 1000


VARIANTS = (
    "runc, no hook",
    "runc + `python3 -I -c pass` hook",
    "runc + tether createRuntime",
    "runc + tether createRuntime+poststop",
    "runc + tether createRuntime+poststop, the hook mounts the files",
)


def measure(runs: int, tmp: Path | None = None, rootfs: Path | None = None) -> tuple[dict[str, list[float]], list[float]]:
    """({variant: ms per run}, daemon ms per registration), variants interleaved."""
    own = tmp is None
    tmp = mkdtemp() if own else tmp
    try:
        rootfs = rootfs or build_rootfs(tmp / "rootfs")
        with Daemon(rootfs) as d:
            d.start()
            tether = d.bundle("bench", ["true"])
            spec0 = json.loads((tether / "config.json").read_text())
            python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
            hook_sets = dict(zip(VARIANTS, (
                {},
                {"createRuntime": [{"path": python, "args": ["python3", "-I", "-c", "pass"]}]},
                {"createRuntime": spec0["hooks"]["createRuntime"]},
                spec0["hooks"],
                spec0["hooks"],
            )))
            # the last variant: no tether mounts in config.json (podman's case, oci patch --no-mounts)
            hooks_only = [m for m in spec0["mounts"] if not m.get("source", "").startswith(str(d.run_dir))]
            variants = {}
            for i, (k, hooks) in enumerate(hook_sets.items()):
                b = tmp / f"runc-hook-b{i}"
                b.mkdir()
                mounts = hooks_only if k == VARIANTS[-1] else spec0["mounts"]
                (b / "config.json").write_text(json.dumps(dict(spec0, hooks=hooks, mounts=mounts)))
                variants[k] = b
            times: dict[str, list[float]] = {k: [] for k in variants}
            for i in range(runs):
                for k, b in variants.items():
                    times[k].append(timed_run(d, f"bench{i}", b))
            d.stop()
            daemon_ms = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in d.log.read_text().splitlines() if "registered bench" in line]
    finally:
        if own:
            shutil.rmtree(tmp, ignore_errors=True)
    return times, daemon_ms


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args(argv)
    times, daemon_ms = measure(a.runs)
    base = statistics.median(times["runc, no hook"])
    print(f"runc run of `true`, {a.runs} runs each, interleaved (ms)")
    print(f"{'variant':40} {'median':>8} {'p90':>8} {'added':>8}")
    for k, xs in times.items():
        med = statistics.median(xs)
        print(f"{k:40} {med:8.1f} {pct(xs, 0.9):8.1f} {med - base:8.1f}")
    print(f"{'daemon time per registration (ms)':40} {statistics.median(daemon_ms):8.1f} {pct(daemon_ms, 0.9):8.1f}")


if __name__ == "__main__":
    main()
