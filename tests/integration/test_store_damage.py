"""Issue 12: a damaged or vanished store while containers run. tether-fused
refuses to start with one line naming the file and the fix, a damaged file
is moved aside (quarantined, with its time), an empty store is never taken
for "no containers", and no running container loses its network or files."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess

import pytest

from harness import FUSED, Daemon, address_in_hosts

SLEEP = ["sleep", "1000000"]


@pytest.fixture(scope="module")
def wired(rootfs):
    d = Daemon(rootfs, strategy="facade")
    try:
        d.start()
        d.start_container("db", None, "--expose", "5432")
        d.start_container("web", SLEEP, "--link", "db:database")
        d.stop()  # SIGTERM: the containers keep their wiring, the file server keeps serving
        good = d.dir / "good.db"
        d.sqlite = d.state_dir / "tether.db"
        con = sqlite3.connect(d.sqlite)  # a consistent copy, WAL included
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        shutil.copy2(d.sqlite, good)
        d.good = good
        yield d
    finally:
        d.close()


def still_working(d: Daemon) -> None:
    """web reaches db by its link, and reads its files: nothing was lost."""
    hosts = d.exec("web", "cat", "/etc/hosts").stdout
    assert address_in_hosts(hosts, "database")
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db"


def start_fails(d: Daemon) -> str:
    p = subprocess.run([FUSED, "--config", str(d.config)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("tether-fused: ")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def restore(d: Daemon) -> None:
    for f in d.state_dir.glob("tether.db*"):
        if ".damaged-" not in f.name:
            f.unlink()
    shutil.copy2(d.good, d.sqlite)


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(os.urandom(p.stat().st_size or 4096))


def _zero_header(p):
    data = bytearray(p.read_bytes())
    data[:100] = bytes(100)
    p.write_bytes(bytes(data))


def _bad_row(p):
    con = sqlite3.connect(p)
    con.execute("UPDATE containers SET publish='not json' WHERE name='web'")
    con.commit()
    con.close()


@pytest.mark.parametrize("damage", [_truncate, _garbage, _zero_header, _bad_row],
                         ids=["truncated", "garbage", "zeroed-header", "bad-row"])
def test_a_damaged_store_is_quarantined_and_refused_in_one_line(wired, damage):
    d = wired
    before = {f.name for f in d.state_dir.iterdir()}
    damage(d.sqlite)
    try:
        line = start_fails(d)
        assert line.startswith(f"tether-fused: the store {d.sqlite} is damaged (")
        assert "moved it aside to" in line and "tether-fused --rebuild-store" in line
        moved = [f for f in d.state_dir.iterdir() if f.name not in before and ".damaged-" in f.name]
        assert moved and str(moved[0]) in line
        assert not d.sqlite.exists()  # never read again
        still_working(d)
    finally:
        restore(d)


@pytest.mark.parametrize("how", ["deleted", "empty", "empty-state-dir"])
def test_a_missing_store_while_containers_run_is_refused(wired, how):
    d = wired
    if how == "deleted":
        d.sqlite.unlink()
    elif how == "empty":
        d.sqlite.write_bytes(b"")
    else:
        shutil.rmtree(d.state_dir)
    try:
        line = start_fails(d)
        assert line.startswith(f"tether-fused: the store {d.sqlite} is missing or empty, while 2 container(s) are wired")
        assert "tether-fused --rebuild-store" in line
        assert not d.sqlite.exists()  # the empty file that start made is gone: the next start refuses too
        assert start_fails(d) == line
        still_working(d)
    finally:
        d.state_dir.mkdir(exist_ok=True)
        restore(d)


def test_after_the_refusals_the_good_store_starts_as_before(wired):
    d = wired
    d.start()
    try:
        assert {c["name"]: c["state"] for c in d.cli_json("ps")} == {"db": "running", "web": "running"}
        still_working(d)
    finally:
        d.stop()


def test_rebuild_store_brings_back_the_running_containers_as_they_were(wired):
    """Deleted while both run: --rebuild-store finds them by their mounts of
    tether's files, reads address and MAC from their eth0, ids from runc, and
    the links (facade included) from the hosts files still served."""
    d = wired
    d.start()
    before = {c["name"]: c for c in d.cli_json("ps")}
    web_hosts = d.exec("web", "cat", "/etc/hosts").stdout
    d.stop()
    d.sqlite.unlink()
    assert "missing or empty" in start_fails(d)
    try:
        d.start(args=("--rebuild-store", "--runc-root", str(d.runc_root)))
        after = {c["name"]: c for c in d.cli_json("ps")}
        for name in ("db", "web"):
            keep = ("id", "state", "ip", "mac", "pid", "links")
            assert {k: after[name][k] for k in keep} == {k: before[name][k] for k in keep}, name
            assert after[name]["note"].startswith("rebuilt from the running container at")
        assert d.exec("web", "cat", "/etc/hosts").stdout == web_hosts  # the same facade, the same lines
        assert d.container("db")["expose"] == ["5432/tcp"]
        still_working(d)
        log = d.log.read_text()
        assert "rebuilt the store: link web:database->db at " in log
        # and it refuses to rebuild over a good store
        d.stop()
        line = start_fails_with(d, "--rebuild-store")
        assert line.startswith(f"tether-fused: the store {d.sqlite} is readable (2 container(s))")
    finally:
        d.stop()
        restore(d)


def start_fails_with(d: Daemon, *args: str) -> str:
    p = subprocess.run([FUSED, "--config", str(d.config), *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 1, (p.returncode, p.stderr)
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("tether-fused: ")]
    return line
