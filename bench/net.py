"""Network set-up + teardown of one container: tether against netavark and CNI.

    .venv/bin/python -m bench.net [--runs 40]

Each run gives a fresh network namespace (`unshare -n sleep`) to one of:
  tether    tether-hook createRuntime, then poststop, with the OCI state on
            stdin (as runc runs them) against an isolated tether-fused; the
            daemon's own registration time is read from its log
  netavark  `netavark setup` then `teardown` (podman's options JSON on stdin),
            on a bridge kept alive by another container
  CNI       bridge + host-local ADD then DEL; with a port, portmap chained
and times the pair. Without and with one published TCP port, interleaved
(the order rotates every run) so machine drift cancels. Everything a run
makes is removed; only addresses inside the benchmark's namespaces are used.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import pct, peers  # noqa: E402
from harness import _TAKEN, HOOK, build_rootfs, free_subnet  # noqa: E402
from bench.track import Daemon, mkdtemp  # noqa: E402
from fused.protocol import request  # noqa: E402

VARIANTS = ("tether", "netavark", "cni")


def tether_once(d: Daemon, name: str, port: bool) -> tuple[float, float]:
    """(createRuntime, poststop) hook round trips for a new container: ms."""
    ann = {"io.tether.name": name}
    if port:
        ann |= {"io.tether.expose": "5432", "io.tether.publish": "5432"}
    # a bundle whose config.json mounts the served files (as `tether oci
    # patch` writes it): the hook has nothing to mount, as with runc
    bundle = d.dir / "bundles" / name
    if not bundle.exists():
        d.bundle(name, ["true"])
    with peers.Netns() as ns:
        state = json.dumps(
            {"ociVersion": "1.0.2", "id": name, "status": "created", "pid": ns.pid,
             "bundle": str(bundle), "annotations": ann}
        ).encode()
        t0 = time.perf_counter()
        peers._run([HOOK, "--config", str(d.config), "createRuntime"], state)
        t1 = time.perf_counter()
        peers._run([HOOK, "--config", str(d.config), "poststop"], state)
        t2 = time.perf_counter()
    # untimed: free the leases, so every run starts from the same store (this
    # also waits for the veth removal poststop queued on the daemon's worker)
    request(str(d.sock), "rm", {"name": name})
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def daemon_times(d: Daemon, prefix: str) -> list[float]:
    """The daemon's own registration times (its log) for names starting with prefix."""
    out = []
    for line in d.log.read_text().splitlines():
        if f"registered {prefix}" in line and " in " in line:
            out.append(float(line.rsplit(" in ", 1)[1].split()[0]))
    return out


def measure(runs: int, rootfs: Path, tmp: Path, warmup: int = 2) -> dict[str, list[float]]:
    """{"tether"|"netavark"|"cni"|"tether daemon"|"tether create"|"tether poststop"
    + (" port" for the port variant): ms list}. "tether" is create + poststop."""
    have = peers.available()
    before = peers.peer_chains()
    nv = cni = None
    out: dict[str, list[float]] = {}
    try:
        with Daemon(rootfs, ports=100, driver="iptables") as d, Daemon(rootfs, ports=100, driver="nftables") as dn:
            d.start()
            dn.start()
            port_base = random.randrange(30000, 39000, 10)
            if have["netavark"]:
                nv = peers.Netavark(tmp, free_subnet(24, range(100, 200), _TAKEN), port_base)
                nv.start()
            if have["cni"]:
                cni = peers.Cni(tmp, free_subnet(24, range(100, 200), _TAKEN), port_base + 1)
            tethers = {"tether": d, "tether nft": dn}  # the iptables driver, the nftables one
            fns = {"tether": None, "tether nft": None, "netavark": nv, "cni": cni}
            fns = {k: v for k, v in fns.items() if k in tethers or v is not None}
            for i in range(warmup + runs):
                for port in (False, True):
                    order = list(fns)
                    r = i % len(order)
                    sfx = " port" if port else ""
                    for k in order[r:] + order[:r]:
                        if k in tethers:
                            create, post = tether_once(tethers[k], "p" if port else "n", port)
                            dt = create + post
                            if i >= warmup:
                                out.setdefault(k + " create" + sfx, []).append(create)
                                out.setdefault(k + " poststop" + sfx, []).append(post)
                        else:
                            dt = fns[k].once(port)
                        if i >= warmup:
                            out.setdefault(k + sfx, []).append(dt)
            for k, t in tethers.items():
                t.stop()  # flushes its log
                out[k + " daemon"] = daemon_times(t, "n")[warmup:]
                out[k + " daemon port"] = daemon_times(t, "p")[warmup:]
    finally:
        for p in (nv, cni):
            if p is not None:
                p.close()
        peers.remove_chains(peers.new_chains(before, peers.peer_chains()))
    return out


LABELS = {
    "tether": "tether (iptables) hooks createRuntime+poststop",
    "tether create": "  of which createRuntime",
    "tether poststop": "  of which poststop",
    "tether daemon": "tether (iptables) daemon, registration only (its log)",
    "tether nft": "tether (nftables) hooks createRuntime+poststop",
    "tether nft create": "  of which createRuntime",
    "tether nft poststop": "  of which poststop",
    "tether nft daemon": "tether (nftables) daemon, registration only (its log)",
    "netavark": "netavark setup+teardown",
    "cni": "CNI bridge+host-local ADD+DEL",
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    a = ap.parse_args(argv)
    tmp = mkdtemp()
    try:
        res = measure(a.runs, build_rootfs(tmp / "rootfs"), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"network set-up + teardown of one container, {a.runs} runs each, interleaved (ms)")
    print(f"{'variant':50} {'median':>8} {'p90':>8}")
    for port in (False, True):
        for k, label in LABELS.items():
            xs = res.get(k + (" port" if port else ""))
            if xs:
                name = label + (", one port" if port else "") + (" (+portmap)" if port and k == "cni" else "")
                print(f"{name:50} {statistics.median(xs):8.1f} {pct(xs, 0.9):8.1f}")


if __name__ == "__main__":
    main()
