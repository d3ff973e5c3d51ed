"""The one benchmark command: every figure of README's Speed, against its peers.

    .venv/bin/python -m bench [--quick] [--out bench/out]     (as root; `make bench`)

Runs, in turn (progress on stderr):
  net     network set-up + teardown of one container, without and with one
          published port: tether's hooks against netavark and CNI (bench.net)
  runc    `runc run` of `true` with tether's hooks, with no hook and with a
          `python3 -c pass` hook (bench.runc_hook)
  read    open+read+close of a ~500-byte served hosts file against tmpfs and
          an LXCFS file, with the reader on the file server's CPU, on another
          CPU, and unpinned (bench.read_hosts, bench.peers.Lxcfs)
  move    `tether move` at 1, 10, 100 and 1000 links (bench.move)
  scale   1000 registered containers: the daemon's RSS and hosts read latency
          (bench.scale)
  core    the daemon's own share of a registration and of a move, in
          process, at 1 and 1000 (bench.core: no kernel)
  restart tether-fused's restart at 1 and at 1000 registered containers:
          from its exec until `ps` and DNS answer (bench.restart)
  dns     one container floods the gateway's port 53 at full speed: the
          others' DNS answers and a registration meanwhile, against no
          flood and a container burning a CPU (bench.dns)
  cluster several hosts (network namespaces) on a throwaway etcd: a
          registration against SQLite's, a move's propagation to another
          host's files, starts on 3 hosts at once (bench.cluster)
then prints ONE table (median / p90 for tether and each peer, the ratio, the
goal and whether it is met), writes it to OUT/table.md, the raw numbers to
OUT/results.json and the figure to OUT/bench.png, and checks that nothing the
benchmark made is left behind (processes it started and their children,
links, namespaces, chains, mounts, dirs, cgroups: bench.made), and nothing
else: another shell's processes or another daemon's bridge never count.
Each part interleaves tether's and the peers' runs so machine drift cancels.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from bench import cluster, core, made, move, net, pct, peers, read_hosts, restart, runc_hook, scale, strategies, track  # noqa: E402
from bench import dns as dns_bench  # noqa: E402
from harness import build_rootfs  # noqa: E402

FULL = dict(restart=10, net=100, runc=50, reads=50000, move=25, containers=1000, scale_reads=20000, scale_again=True, core=30,
            strategies=8, cluster=30, per_host=50, dns=3)
QUICK = dict(restart=4, net=10, runc=8, reads=4000, move=5, containers=1000, scale_reads=4000, scale_again=False, core=10,
             strategies=4, cluster=8, per_host=20, dns=1)
SIZES = (1, 10, 100, 1000)
HOSTS_LINKS = 14  # a ~500-byte hosts file


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- what the benchmark left behind -----------------------------------------------
def leftovers(settle: float = 5.0) -> dict[str, list[str]]:
    """What this run made (bench.track.MADE) that is still there: only that,
    never another shell's processes or another daemon's bridge. Killed
    processes take a moment to go: look again for up to `settle` seconds."""
    deadline = time.monotonic() + settle
    while True:
        left = made.left_behind(track.MADE, track.observe())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


# --- table -------------------------------------------------------------------------
def mp(xs: list[float], nd: int = 1) -> str:
    return f"{statistics.median(xs):.{nd}f} / {pct(xs, 0.9):.{nd}f}"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


class Table:
    COLS = ("row", "tether median / p90", "peer", "peer median / p90", "tether / peer", "goal", "met?", "notes")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.verdicts: list[tuple[str, bool]] = []

    def add(self, row="", tether="", peer="", peer_fig="", ratio="", goal="", met: bool | None = None, notes="") -> None:
        m = "" if met is None else ("yes" if met else "**no**")
        if met is not None:
            self.verdicts.append((goal, met))
        self.rows.append((row, tether, peer, peer_fig, ratio, goal, m, notes))

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.COLS) + " |", "|" + "|".join(" --- " for _ in self.COLS) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self.rows]
        return "\n".join(lines)


def build_table(r: dict, quick: bool) -> Table:
    t = Table()
    n = r.get("net")
    if n:
        for port in (False, True):
            sfx = " port" if port else ""
            for key, drv in (("tether nft", "nftables"), ("tether", "iptables")):
                if key + sfx not in n:
                    continue
                row = (f"network set-up + teardown, one container, {drv}, "
                       + ("one published port (ms)" if port else "no port (ms)"))
                tx = n[key + sfx]
                first = True
                for k, label in (("netavark", "netavark setup+teardown, bridge kept alive"),
                                 ("cni", "CNI bridge + host-local ADD+DEL" + (", portmap chained" if port else ""))):
                    if k + sfx not in n:
                        t.add(row if first else "", mp(tx) if first else "", label, "n/a (not installed)")
                        first = False
                        continue
                    ratio = med(tx) / med(n[k + sfx])
                    goal, met = "", None
                    if port and k == "netavark":
                        goal, met = "≤ 0.5× netavark", ratio <= 0.5
                    notes = (f"tether: createRuntime {mp(n[key + ' create' + sfx])} + poststop "
                             f"{mp(n[key + ' poststop' + sfx])} hook round trips" if first else "")
                    t.add(row if first else "", mp(tx) if first else "", label, mp(n[k + sfx]), f"{ratio:.2f}", goal, met, notes)
                    first = False
                d = n[key + " daemon" + sfx]
                t.add("  same, tether-fused's own registration time (its log)", mp(d), "", "", "", "", None,
                      "the daemon's share of createRuntime: store txn, veth, firewall")
    rh = r.get("runc")
    if rh:
        tx = rh["times"]["runc + tether createRuntime+poststop"]
        first = True
        for k in ("runc, no hook", "runc + `python3 -I -c pass` hook"):
            added = med(tx) - med(rh["times"]["runc, no hook"])
            goal, met = ("≤ +25 ms over runc", added <= 25) if k == "runc, no hook" else ("", None)
            t.add("runc run of `true` with tether's hooks (ms)" if first else "", mp(tx) if first else "", k,
                  mp(rh["times"][k]), f"{med(tx) / med(rh['times'][k]):.2f}", goal, met,
                  f"tether adds {med(tx) - med(rh['times']['runc, no hook']):.1f} ms; createRuntime only: "
                  f"{mp(rh['times']['runc + tether createRuntime'])}"
                  + (f"; the hook mounting the files (podman's case): {mp(hm)}"
                     if (hm := rh["times"].get(runc_hook.VARIANTS[-1])) else "") if first else "")
            first = False
    rd = r.get("read")
    if rd:
        us = rd["us"]
        tx = us["tether"]
        cpu, other = rd.get("reader_cpu"), rd.get("other_cpu")
        t.add(f"read /etc/hosts (open+read+close), {rd['bytes']} B (µs), nothing pinned", mp(tx, 2),
              "tmpfs, same bytes", mp(us["tmpfs"], 2), f"{med(tx) / med(us['tmpfs']):.2f}", "", None,
              "a change shows on the next read, held open or not (checked); an OPEN and a READ round trip per read")
        if "tether held" in us:
            th = us["tether held"]
            t.add("  same, while another descriptor holds it open (µs)", mp(th, 2), "tether, nothing held", mp(tx, 2),
                  f"{med(th) / med(tx):.2f}", "", None, "the held file follows every change (its next pass reads it)")
        if "tether sendfile" in us:
            ts_, tf = us["tether sendfile"], us["tmpfs sendfile"]
            t.add("  same, by sendfile into a pipe, as busybox cat (µs)", mp(ts_, 2), "tmpfs, sendfile", mp(tf, 2),
                  f"{med(ts_) / med(tf):.2f}", "", None, "through the page cache: one READ fills it per open")
        if "lxcfs" in us:
            x = med(tx) / med(us["lxcfs"])
            t.add("", "", "LXCFS /proc/uptime (FUSE)", mp(us["lxcfs"], 2), f"{x:.3f}", "≤ 0.15× LXCFS", x <= 0.15,
                  f"LXCFS's file is {rd['lxcfs_bytes']} B")
        else:
            t.add("", "", "LXCFS /proc/uptime", "n/a (not installed)")
        for sfx, label, goal in ((" same CPU", f"reader and file server on CPU {cpu}", 4.0),
                                 (" other CPU", f"reader on CPU {cpu}, file server on CPU {other}", None)):
            if "tether" + sfx not in us:
                continue
            ts, tp = us["tether" + sfx], us["tmpfs pinned"]
            x = med(ts) / med(tp)
            t.add(f"  same, {label} (µs)", mp(ts, 2), f"tmpfs, reader on CPU {cpu}", mp(tp, 2), f"{x:.2f}",
                  "≤ 4× tmpfs" if goal else "", (x <= goal) if goal else None,
                  f"{med(ts) / med(tx):.2f}× unpinned tether; {med(ts) / med(us['tmpfs']):.2f}× unpinned tmpfs"
                  if goal else f"{med(ts) / med(tx):.2f}× unpinned tether")
            if "lxcfs" + sfx in us:
                lx = us["lxcfs" + sfx]
                t.add("", "", "LXCFS /proc/uptime, " + label.replace("file server", "lxcfs"), mp(lx, 2),
                      f"{med(ts) / med(lx):.2f}", "", None, f"{med(lx) / med(us['lxcfs']):.2f}× unpinned LXCFS")
    mv = r.get("move")
    if mv:
        for drv, byd in sorted(mv.items(), reverse=True):  # nftables first
            by = {int(k): v for k, v in byd.items()}
            for size, m in sorted(by.items()):
                f = m["files"]
                goal, met, ratio = "", None, ""
                if size == 1:
                    goal, met = "≤ 20 ms", med(f) <= 20
                if size in (100, 1000) and 10 in by:
                    x = med(f) / med(by[10]["files"])
                    ratio = f"{x:.2f}× 10 links"
                    limit = (1.1 if drv == "nftables" else 1.3) if size == 1000 else 2
                    goal, met = f"≤ {limit}× of 10 links", x <= limit
                tcp_ratio = f" ({med(m['tcp']) / med(by[10]['tcp']):.2f}× 10 links)" if size in (100, 1000) and 10 in by else ""
                t.add(f"retarget (tether move), {drv}, {size} link{'s' if size > 1 else ''}: until files show it (ms)",
                      mp(f), "(no peer retargets)", "", ratio, goal, met,
                      f"api returns {mp(m['api'])}; new TCP reaches the new target {mp(m['tcp'])}{tcp_ratio}")
    st = r.get("strategies")
    if st:
        for name in strategies.STRATEGIES:
            m = st.get(name)
            if not m:
                continue
            every = all(m["reached"])
            goal = {"facade": ("≤ 20 ms", 20), "veth-move": ("≤ 10 ms, ≤ 10 lost", 10),
                    "reassign": ("≤ 10 ms, ≤ 10 lost", 10)}.get(name)
            met = None
            if goal:
                met = every and med(m["reach_ms"]) <= goal[1] and (name == "facade" or med(m["lost"]) <= 10)
            t.add(f"strategy {name}: `tether move` until a new TCP connection to the cached address reaches NEW (ms)",
                  mp(m["reach_ms"]) if every else "never (by design)" if name == "direct" else "never",
                  "(no peer has strategies)", "", "", goal[0] if goal else "", met,
                  f"UDP every 1 ms: {med(m['lost']):.0f} lost (max {max(m['lost'])}); "
                  f"cached address reaches NEW: {'yes' if every else 'no'}; api returns {mp(m['api_ms'])}")
    sc = r.get("scale")
    if sc:
        N = sc["n"]
        again = "1 after" in sc["read_us"]
        rss1, rssn = sc["rss_kb"]["1"] / 1024, sc["rss_kb"][str(N)] / 1024
        t.add(f"{N} registered containers: tether-fused RSS (MiB)", f"{rssn:.1f} ({rssn * 1.048576:.1f} MB)",
              "same daemon, 1 container", f"{rss1:.1f}", f"{rssn / rss1:.2f}", "≤ 60 MiB", rssn <= 60,
              f"started in {sc['start_s']:.0f} s ({sc['parallel']} at a time), stopped+deleted in "
              f"{sc['teardown_s']:.0f} s" + (f"; RSS after removing them: {sc['rss_kb']['1 after'] / 1024:.1f} MiB"
                                              if again else ""))
        r1, rn = sc["read_us"]["1"] + sc["read_us"].get("1 after", []), sc["read_us"][str(N)]
        t1, tn = sc["tmpfs_us"]["1"] + sc["tmpfs_us"].get("1 after", []), sc["tmpfs_us"][str(N)]
        notes = (f"1 before: {mp(sc['read_us']['1'], 2)}, 1 after: {mp(sc['read_us']['1 after'], 2)}; " if again else "")
        t.add(f"{N} registered containers: hosts read, {sc['bytes']} B (µs)", mp(rn, 2),
              "same file, 1 container" + (" (before and after)" if again else ""), mp(r1, 2),
              f"{med(rn) / med(r1):.2f}", "≤ 1.2× of 1 container", med(rn) / med(r1) <= 1.2,
              notes + f"tmpfs in the same blocks: {med(tn) / med(t1):.2f}× ({N} vs 1)")
        g1, gn = sc["reg_ms"]["1"], sc["reg_ms"][str(N)]
        t.add(f"  {N} registered containers: one more registration (ms, daemon's log)", mp(gn), "same, 1 container",
              mp(g1), f"{med(gn) / med(g1):.2f}", "≤ 1.3× of 1 container", med(gn) / med(g1) <= 1.3,
              "5 sequential starts of a probe container")
    rs = r.get("restart")
    if rs:
        lo, hi = min(rs, key=int), max(rs, key=int)
        a, b = rs[hi], rs[lo]

        def at(m: dict, key: str) -> str:  # a median in ms, or "-" when the log had no such line
            return f"{med(m[key]) * 1000:.0f}" if m.get(key) else "-"

        for key, row, notes in (
            ("ps", f"tether-fused restart at {hi} containers: exec until `ps` is answered (ms)",
             f"its log at {hi}: first line (interpreter, imports) {at(a, 'first line')}, ready {at(a, 'ready')}; "
             f"at {lo}: {at(b, 'first line')}, {at(b, 'ready')}; SIGTERM until it exited {at(a, 'stop')} at {hi}, "
             f"{at(b, 'stop')} at {lo} (bench.restart)"),
            ("dns", "  same, exec until DNS answers (ms)",
             f"longest time DNS did not answer, from the SIGTERM on: {at(a, 'dns silent')} at {hi}, "
             f"{at(b, 'dns silent')} at {lo}"),
        ):
            t.add(row, mp([x * 1000 for x in a[key]], 0), f"same, {lo} container", mp([x * 1000 for x in b[key]], 0),
                  f"{med(a[key]) / med(b[key]):.2f}" if med(b[key]) else "", "", None, notes)
    co = r.get("core")
    if co:
        for what, label in (("register", "one more registration and its stop"), ("move", "move")):
            by = co[what]
            lo, hi = min(by, key=int), max(by, key=int)
            t.add(f"daemon core, in process: {label} at {hi} (ms)", mp(by[hi]), f"same at {lo}", mp(by[lo]),
                  f"{med(by[hi]) / med(by[lo]):.2f}", "", None,
                  "bench.core: SQLite store, no kernel (no veth, firewall or file server); "
                  "`python -m bench.core --profile " + what + "` names where the time goes")
    dn = r.get("dns")
    for drv, label in (("nftables", "nftables' kernel limit at 2x the budget"), ("none", "no firewall: the DNS process alone")):
        m = (dn or {}).get(drv)
        if not m:
            continue
        fl, qu, hog = m["flood"], m["quiet"], m["hog"]
        share, ok = dns_bench.within, dns_bench.answered
        t.add(f"DNS while one container floods port 53 at full speed ({label}): others' queries answered within "
              "50 ms (%)", f"{share(fl['lat_ms']) * 100:.2f}", "same, no flood", f"{share(qu['lat_ms']) * 100:.2f}", "",
              "≥ 99 %", share(fl["lat_ms"]) >= 0.99,
              f"median / p99 {statistics.median(ok(fl['lat_ms'])):.1f} / {pct(ok(fl['lat_ms']), 0.99):.1f} ms "
              f"(quiet {statistics.median(ok(qu['lat_ms'])):.1f} / {pct(ok(qu['lat_ms']), 0.99):.1f}); the flooder "
              f"sent {med(fl['sent_per_s']):.0f} q/s, was answered {med(fl['answered_per_s']):.0f}/s and REFUSED "
              f"{med(fl['refused_per_s']):.0f}/s; a container burning a CPU instead: {share(hog['lat_ms']) * 100:.2f} %; "
              f"while containers register: {share(fl['lat_ms_registering']) * 100:.2f} % (no flood "
              f"{share(qu['lat_ms_registering']) * 100:.2f} %)")
        x = med(fl["reg_ms"]) / med(qu["reg_ms"])
        t.add("  same, a registration during the flood (ms, daemon's log)", mp(fl["reg_ms"]), "same, no flood",
              mp(qu["reg_ms"]), f"{x:.2f}", "≤ 1.5× no flood", x <= 1.5,
              f"a container burning a CPU, no DNS: {mp(hog['reg_ms'])} ({med(hog['reg_ms']) / med(qu['reg_ms']):.2f}× "
              "no flood): what the flooder's CPU costs the rest")
    cl = r.get("cluster")
    if cl:
        reg, prop, con = cl["register"], cl["propagation"], cl["contention"]
        ratio = med(reg["etcd"]) / med(reg["sqlite"])
        t.add("several hosts: a registration, etcd store (ms, daemon's log)", mp(reg["etcd"]),
              "same, SQLite store (one host)", mp(reg["sqlite"]), f"{ratio:.2f}", "≤ 2× SQLite", ratio <= 2,
              "each host a network namespace; etcd 3.4 on the underlay; starts interleaved")
        t.add("several hosts: `tether move` on one host until a consumer's files on another name NEW (ms)", mp(prop),
              "(no peer spans hosts)", "", "", "≤ 200 ms", med(prop) <= 200,
              "includes the move itself (its conntrack cut) on the first host")
        t.add(f"several hosts: {con['n']} starts on 3 hosts at once (starts/s)", f"{con['per_s']:.1f}",
              "(no peer spans hosts)", "", "", "", None,
              f"{con['seconds']:.1f} s; {con['retried']} commits planned again after another host's; "
              f"addresses and host ports unique: {'yes' if con['unique'] else 'NO'}")
    return t


# --- figure --------------------------------------------------------------------------
def plot(r: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no figure"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.2))
    mv = r.get("move")
    if mv:
        top = 20
        for drv, ls in (("nftables", "-"), ("iptables", "--")):
            if drv not in mv:
                continue
            byd = mv[drv]
            sizes = sorted(int(k) for k in byd)
            for key, label, c in (("api", "API returns", "tab:blue"), ("files", "files show it", "tab:orange"),
                                  ("tcp", "new TCP reaches new target", "tab:green")):
                meds = [med(byd[str(s)][key]) for s in sizes]
                p90s = [pct(byd[str(s)][key], 0.9) for s in sizes]
                a1.plot(sizes, meds, "o" + ls, color=c, label=f"{label}, {drv} (median)")
                a1.fill_between(sizes, meds, p90s, color=c, alpha=0.1)
                top = max(top, max(p90s))
        a1.axhline(20, ls="--", color="grey", lw=1)
        a1.text(sizes[0], 19.6, "goal at 1 link: 20 ms", color="grey", fontsize=8, va="top")
        a1.set_ylim(0, top * 1.6)  # room for the legend
        a1.set_xscale("log")
        a1.set_xticks(sizes, [str(s) for s in sizes])
        a1.set_xlabel("links moved by one `tether move`")
        a1.set_ylabel("ms (line: median, band: up to p90)")
        a1.set_title("Retarget time vs number of links")
        a1.legend(fontsize=8, loc="upper left")
        a1.grid(alpha=0.3)
    n = r.get("net")
    if n:
        groups = [("no port", ""), ("one published port", " port")]
        bars = [("tether, nftables\n(hooks: createRuntime+poststop)", "tether nft", "tab:red"),
                ("tether, iptables\n(hooks: createRuntime+poststop)", "tether", "tab:orange"),
                ("netavark\nsetup+teardown", "netavark", "tab:blue"),
                ("CNI bridge+host-local\n(+portmap) ADD+DEL", "cni", "tab:purple")]
        w = 0.2
        for j, (label, key, c) in enumerate(bars):
            xs, ys, err = [], [], []
            for gi, (_, sfx) in enumerate(groups):
                if key + sfx in n:
                    v = n[key + sfx]
                    xs.append(gi + (j - 1.5) * w)
                    ys.append(med(v))
                    err.append(pct(v, 0.9) - med(v))
            if xs:
                a2.bar(xs, ys, w, color=c, label=label, yerr=[[0] * len(err), err], capsize=3, edgecolor="black", lw=0.5)
                for x, y in zip(xs, ys):
                    a2.text(x, y * 0.2, f"{y:.0f}", ha="center", fontsize=8)
        if "netavark port" in n:
            g = 0.5 * med(n["netavark port"])
            a2.hlines(g, 1 - 2 * w, 1 + 2 * w, colors="red", linestyles="--", lw=1)
            a2.text(1 + 2 * w, g, " goal: 0.5× netavark", color="red", fontsize=8, va="center")
        a2.set_xticks(range(len(groups)), [g for g, _ in groups])
        a2.set_ylabel("ms per container (bar: median, whisker: p90)")
        a2.set_title("Network set-up + teardown of one container")
        a2.legend(fontsize=8, loc="upper left")
        a2.grid(axis="y", alpha=0.3)
    fig.suptitle("tether benchmark" + (" (--quick)" if r.get("quick") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- main --------------------------------------------------------------------------
PARTS = ("net", "runc", "read", "move", "strategies", "scale", "core", "restart", "dns", "cluster")


def run(parts: tuple[str, ...], cfg: dict, tmp: Path) -> dict:
    r: dict = {"part_s": {}}
    t0 = time.monotonic()

    def done(part: str) -> None:
        nonlocal t0
        r["part_s"][part] = round(time.monotonic() - t0, 1)
        log(f"      ({r['part_s'][part]:.0f} s)")
        t0 = time.monotonic()

    have = peers.available()
    missing = [k for k, v in have.items() if not v]
    if missing:
        log(f"peers not installed: {', '.join(missing)} (`make bench` installs them): their columns say n/a")
    rootfs = build_rootfs(tmp / "rootfs")
    if "net" in parts:
        log(f"[net] set-up + teardown: tether hooks, netavark, CNI; {cfg['net']} runs each, with and without a port")
        r["net"] = net.measure(cfg["net"], rootfs, tmp)
        done("net")
    if "runc" in parts:
        log(f"[runc] runc run of true: no hook, python3 hook, tether hooks; {cfg['runc']} runs each")
        times, daemon_ms = runc_hook.measure(cfg["runc"], tmp, rootfs)
        r["runc"] = {"times": times, "daemon_ms": daemon_ms}
        done("runc")
    if "read" in parts:
        log(f"[read] open+read+close: tmpfs, tether, LXCFS; reader on the server's CPU, on another, unpinned; "
            f"{cfg['reads']} reads each")
        lx = peers.Lxcfs(tmp) if have["lxcfs"] else None
        try:
            extra = {}
            if lx:
                lx.start()
                extra = {"lxcfs": (lx.uptime, lx.proc.pid)}
            us, size, info = read_hosts.measure(cfg["reads"], HOSTS_LINKS, rootfs, tmp, extra)
            r["read"] = {"us": us, "bytes": size, "reader_cpu": info["reader_cpu"], "other_cpu": info["other_cpu"]}
            if lx:
                r["read"]["lxcfs_bytes"] = len(Path(lx.uptime).read_bytes())
        finally:
            if lx:
                lx.close()
        done("read")
    if "move" in parts:
        r["move"] = {}
        for drv in ("nftables", "iptables"):
            for size in SIZES:
                log(f"[move] tether move ({drv}) at {size} links, {cfg['move']} moves")
                r["move"].setdefault(drv, {})[str(size)] = move.measure(rootfs, size, cfg["move"], drv)
        done("move")
    if "strategies" in parts:
        r["strategies"] = {}
        for name in strategies.STRATEGIES:
            log(f"[strategies] {name}: UDP every 1 ms and TCP every 5 ms to the cached address, {cfg['strategies']} moves")
            m = strategies.measure(rootfs, name, cfg["strategies"])
            m.pop("log", None)
            r["strategies"][name] = m
        done("strategies")
    if "scale" in parts:
        log(f"[scale] {cfg['containers']} runc containers against one tether-fused")
        sc = scale.measure(cfg["containers"], rootfs, tmp, cfg["scale_reads"], 8, log=log, again=cfg["scale_again"])
        sc["parallel"] = 8
        sc = json.loads(json.dumps(sc))  # int keys -> str, as in results.json
        r["scale"] = sc
        done("scale")
    if "restart" in parts:
        log(f"[restart] tether-fused restarts at 1 and {cfg['containers']} registered containers, {cfg['restart']} each")
        r["restart"] = restart.measure(rootfs, (1, cfg["containers"]), cfg["restart"], log=log)
        done("restart")
    if "core" in parts:
        log(f"[core] the daemon's own share of register and move, in process, at {SIZES[0]} and {SIZES[-1]}")
        r["core"] = core.measure((SIZES[0], SIZES[-1]), cfg["core"])
        done("core")
    if "dns" in parts:
        log(f"[dns] one container floods port 53, {cfg['dns']} rounds of quiet, flood and CPU-hog phases, "
            "with nftables' kernel limit and with no firewall")
        r["dns"] = {drv: dns_bench.flood(rootfs, cfg["dns"], drv, log=log) for drv in ("nftables", "none")}
        done("dns")
    if "cluster" in parts:
        log(f"[cluster] several hosts on etcd: registration against SQLite, a move seen on another host "
            f"({cfg['cluster']} runs), {cfg['per_host']} starts on each of 3 hosts at once")
        r["cluster"] = cluster.measure(rootfs, cfg["cluster"], cfg["per_host"])
        done("cluster")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (about 3 minutes instead of about 5)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: run as root (it starts containers, namespaces and firewall rules)", file=sys.stderr)
        return 2
    parts = tuple(p for p in a.only.split(",") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}: choose from {PARTS}")
    cfg = QUICK if a.quick else FULL
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    tmp = track.mkdtemp()
    try:
        r = run(parts, cfg, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["quick"] = a.quick
    r["config"] = cfg
    r["elapsed_s"] = time.monotonic() - t0
    left = leftovers()
    table = build_table(r, a.quick)
    head = (f"tether benchmark{' (--quick)' if a.quick else ''}: {os.uname().release}, {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {r['elapsed_s'] / 60:.1f} min. Medians / p90 of "
            f"{cfg['net']} set-up runs, {cfg['runc']} runc runs, {cfg['reads']} reads, {cfg['move']} moves per size; "
            f"tether's and the peers' runs interleaved.")
    met = sum(1 for _, m in table.verdicts if m)
    foot = f"Goals met: {met} of {len(table.verdicts)}."
    foot += " Left behind: nothing." if not left else " Left behind: " + "; ".join(f"{k}: {v}" for k, v in left.items())
    md = f"{head}\n\n{table.markdown()}\n\n{foot}\n"
    (a.out / "table.md").write_text(md)
    (a.out / "results.json").write_text(json.dumps(r, indent=1))
    err = plot(r, a.out / "bench.png")
    if not err and r.get("strategies"):
        strategies.plot(r["strategies"], a.out / "strategies.png")
    print(md)
    print(f"written: {a.out / 'table.md'}, {a.out / 'results.json'}" + ("" if err else f", {a.out / 'bench.png'}")
          + (f", {a.out / 'strategies.png'}" if not err and r.get("strategies") else ""))
    if err:
        print(err)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
