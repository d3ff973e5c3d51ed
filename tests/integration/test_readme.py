"""Issue 11: the README's quick starts run as pasted, so they cannot rot.

The ```sh blocks of "Quick start with runc" (and the stop block at the end of
the podman one) run in order in one bash, as a user would paste them, in an
empty directory, with TETHER_CONFIG naming an isolated config of the test's
own. `runc` on the PATH is a wrapper that adds the test's `--root`; nothing
else differs from what a user types. The podman blocks run the same way
against a daemon of the test's, with a `podman` wrapper that adds the
isolating flags of test_podman.Podman.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import BIN, Daemon, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def blocks(title: str, lang: str = "sh") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", section(title), re.M | re.S)


def wrapper(bin_dir: Path, name: str, real: str, *flags: str) -> None:
    path = bin_dir / name
    quoted = " ".join(f"'{f}'" for f in flags)
    path.write_text(f'#!/bin/sh\nexec {real} {quoted} "$@"\n')
    path.chmod(0o755)


def bash(script: str, cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def user_env(d: Daemon, bin_dir: Path, **extra: str) -> dict:
    path = f"{bin_dir}:{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {"PATH": path, "HOME": str(d.dir), "TETHER_CONFIG": str(d.config), "LANG": "C.UTF-8", **extra}


def test_the_blocks_are_where_the_test_looks():
    runc = blocks("Quick start with runc")
    assert len(runc) >= 3 and "tether oci patch web" in runc[0]
    podman = blocks("Quick start with podman")
    assert "tether-fused --cleanup" in podman[-1] and "podman run" in podman[0]
    assert all("/run/tether" not in b for b in runc + podman)  # <run_dir>, never a hard-coded one


def test_runc_quick_start_runs_as_pasted(rootfs):
    d = Daemon(rootfs)  # its config only: the quick start starts tether-fused itself
    work, bin_dir = d.dir / "quickstart", d.dir / "bin"
    work.mkdir()
    bin_dir.mkdir()
    wrapper(bin_dir, "runc", shutil.which("runc"), "--root", str(d.runc_root))
    script = "\n".join(blocks("Quick start with runc") + blocks("Quick start with podman")[-1:])
    try:
        p = bash(script, work, user_env(d, bin_dir))
        log = "".join(f"--- {f.name}\n{f.read_text()}" for f in sorted(work.glob("*.log")))
        assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}\nlogs:\n{log[-4000:]}"
        out = p.stdout
        # what the README says a user sees, line by line where it cannot differ
        assert out.count("127.0.0.1\tlocalhost\n") == 2
        assert re.search(r"^10\.\d+\.\d+\.\d+\tdatabase db$", out, re.M)
        assert re.search(r"^10\.\d+\.\d+\.\d+\tdatabase db2$", out, re.M)
        answers = [ln for ln in out.splitlines() if ln in ("db", "db2")]
        assert answers == ["db", "db2"], out
        (expected,) = blocks("Quick start with runc", "text")
        header = next(ln for ln in expected.splitlines() if ln.startswith("NAME"))
        ps_headers = [ln for ln in out.splitlines() if ln.startswith("NAME")]
        assert len(ps_headers) == 2 and all(h.split() == header.split() for h in ps_headers)
        assert re.search(r"^db +db +running .*0\.0\.0\.0:\d+->5432/tcp", out, re.M)
        assert "moved db to db2" in out
        assert all(f"removed {c}" in out for c in ("web", "db", "db2")), out  # tether rm
        # all gone: the daemon, its mount, its bridge
        assert not (d.run_dir / "fused.sock").exists() or not _listening(d)
        assert not os.path.ismount(d.run_dir / "fs")
        assert subprocess.run(["ip", "link", "show", d.bridge], capture_output=True).returncode != 0
    finally:
        for name in ("fused", "fsd"):
            try:
                d.pids.add(d.pid_of(name))
            except (OSError, ValueError):
                pass
        d.close()


def _listening(d: Daemon) -> bool:
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.sock))
        return True
    except OSError:
        return False


def test_podman_quick_start_runs_as_pasted(rootfs):
    import test_podman

    if test_podman.PODMAN is None:
        pytest.skip(test_podman.SKIP)
    d = Daemon(rootfs, strategy="facade")
    pm = test_podman.Podman(d, rootfs)
    hooks = Path("/usr/share/containers/oci/hooks.d")
    names = [hooks / "tether-createruntime.json", hooks / "tether-poststop.json"]
    saved = {f: f.read_bytes() for f in names if f.exists()}  # a real installation's: put back after
    work, bin_dir = pm.dir / "quickstart", pm.dir / "bin"
    work.mkdir()
    bin_dir.mkdir()
    shutil.copytree(rootfs, work / "rootfs", symlinks=True)
    wrapper(bin_dir, "podman", test_podman.PODMAN, *pm.flags)
    try:
        d.start()
        script = "\n".join(blocks("Quick start with podman")[:-1])  # the last block stops the daemon
        p = bash(script, work, user_env(d, bin_dir, CONTAINERS_CONF=pm.env["CONTAINERS_CONF"]))
        assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}\nlog:\n{d.log.read_text()[-3000:]}"
        out = p.stdout
        assert re.search(r"^10\.\d+\.\d+\.\d+\tdatabase pdb$", out, re.M), out
        # nc's answer, then the names podman stop, podman start and podman rm print
        assert [ln for ln in out.splitlines() if ln == "pdb"] == ["pdb"] * 4, out
        assert re.search(r"^NAME +ID +STATE", out, re.M)
        assert "pdb" in out.split("NAME", 1)[1]  # tether ps listed it, running again after podman start
        wait_for(lambda: d.cli_json("ps", "-a") == [], timeout=15, what="tether rm of both")
    finally:
        try:
            pm.close()
        finally:
            for f in names:
                if f in saved:
                    f.write_bytes(saved[f])
                else:
                    f.unlink(missing_ok=True)
            d.close()
