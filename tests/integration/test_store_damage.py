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
