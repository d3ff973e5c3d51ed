"""Issue 12: a container whose process is gone is marked stopped within 5 s,
with no poststop, no restart and no SIGHUP; its address is then reusable."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from harness import Daemon, wait_for

SLEEP = ["sleep", "1000000"]


def forget_in_runc(d: Daemon, cid: str) -> None:
    """SIGKILL the container and delete runc's state of it: no poststop ever comes."""
    pid = d.container(cid)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}/ns/net"), timeout=10, what=f"pid {pid} gone")
    shutil.rmtree(d.runc_root / cid)
    d.containers.discard(cid)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():  # runc's cgroup of it, which nobody deletes now
        cg = hierarchy / f"tether-test-{d.tag}-{cid}"
        if cg.is_dir():
            wait_for(lambda: _rmdir(cg), timeout=5, what=f"rmdir {cg}")


def _rmdir(p: Path) -> bool:
    try:
        p.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_dead_containers_are_stopped_within_5_s_and_their_addresses_reused(rootfs):
    with Daemon(rootfs, prefix=29) as d:  # 5 addresses
        d.start()
        names = [f"c{i}" for i in range(5)]
        for n in names:
            d.start_container(n, SLEEP)
        ips = {n: d.container(n)["ip"] for n in names}
        r = d.run("extra", d.bundle("extra", SLEEP), check=False)
        assert r.returncode != 0 and "address pool exhausted" in r.stderr
        d.kill("extra")
        killed = time.monotonic()
        for n in names:
            forget_in_runc(d, n)
        wait_for(lambda: all(c["state"] == "stopped" for c in d.cli_json("ps", "-a")), timeout=5, interval=0.1,
                 what="every dead container stopped")
        took = time.monotonic() - killed
        print(f"\n5 dead containers marked stopped {took:.2f} s after the first kill")
        log = d.log.read_text()
        assert all(f"{n}: its process is gone and no poststop came: marked stopped" in log for n in names)
        # the addresses are sticky, and the pool reuses them least recently stopped first
        d.start_container("extra", SLEEP)
        extra = d.container("extra")
        assert extra["ip"] in ips.values()
        evicted = [n for n in names if d.container(n)["ip"] is None]
        assert len(evicted) == 1 and "evicted" in d.container(evicted[0])["note"]
        assert d.exec("extra", "cat", "/etc/hosts").stdout.endswith(f"{extra['ip']}\textra\n")
