"""Issue 14: the proposal's strategies 1 (veth-move) and 2 (reassign) for
`tether move OLD NEW`: a consumer holding OLD's address reaches NEW.

Real containers; traffic with busybox nc from inside the consumer.
"""
from __future__ import annotations

import contextlib
import subprocess

import pytest

from harness import FUSED, Daemon, serve, wait_for

SLEEP = ["sleep", "1000000"]


def ask(d: Daemon, cid: str, host: str, port: int = 5432) -> str:
    return d.exec(cid, "nc", "-w", "2", host, str(port), check=False).stdout.strip()


def reaches(d: Daemon, cid: str, host: str, want: str) -> str:
    try:
        return wait_for(lambda: ask(d, cid, host) == want and want, timeout=5, what=f"{cid} -> {host}: {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it answers {ask(d, cid, host)!r}\n--- daemon log:\n{d.log.read_text()[-2500:]}") from None


def start_three(d: Daemon) -> None:
    """db and db2 answer their names on 5432; web links to db as "database"."""
    d.start()
    d.start_container("db", serve("db"), "--expose", "5432")
    d.start_container("db2", serve("db2"), "--expose", "5432")
    d.start_container("web", SLEEP, "--link", "db:database")


@contextlib.contextmanager
def moved(rootfs, strategy: str):
    """start_three, then `move db db2`: (the daemon, db's address, which db2 answers at now)."""
    with Daemon(rootfs, driver="nftables", strategy=strategy) as d:
        start_three(d)
        x = d.container("db")["ip"]
        d.cli("move", "db", "db2")
        reaches(d, "web", x, "db2")
        yield d, x


@pytest.fixture(params=["veth-move", "reassign"])
def strategy(request):
    return request.param


def test_a_consumer_holding_the_old_address_reaches_new_and_the_move_undoes(rootfs, strategy):
    with Daemon(rootfs, driver="nftables", strategy=strategy) as d:
        start_three(d)
        x, y = d.container("db")["ip"], d.container("db2")["ip"]
        assert ask(d, "web", x) == "db"
        r = d.cli_json("move", "db", "db2")
        assert r["addresses"] == [{"ip": x, "from": "db", "to": "db2"}]
        # web cached db's address before the move, and is not restarted
        reaches(d, "web", x, "db2")
        assert ask(d, "web", y) == "db2"
        assert ask(d, "web", "database") == "db2"  # its hosts file names db2 now
        assert d.container("db2")["answers"] == [x]
        assert "db2" in d.container("db")["note"]
        # the undo: db answers at its own address again, db2 keeps its own
        d.cli("move", "db2", "db")
        reaches(d, "web", x, "db")
        assert ask(d, "web", y) == "db2"
        assert d.container("db2")["answers"] == []


def test_olds_next_start_gets_an_address_nobody_holds(rootfs, strategy):
    with moved(rootfs, strategy) as (d, x):
        d.kill("db")
        d.start_container("db", serve("db"), "--expose", "5432")
        z = d.container("db")["ip"]
        held = {c["ip"] for c in d.cli_json("ps", "--all") if c["name"] != "db"} | {x}
        assert z not in held
        assert f"{x} is answered by db2" in d.container("db")["note"]
        assert ask(d, "web", x) == "db2" and ask(d, "web", z) == "db"
        # db2 restarts: it answers at x again
        d.kill("db2")
        d.start_container("db2", serve("db2"), "--expose", "5432")
        reaches(d, "web", x, "db2")


def test_veth_move_to_a_stopped_container_is_refused_and_changes_nothing(rootfs):
    with Daemon(rootfs, driver="nftables", strategy="veth-move") as d:
        start_three(d)
        d.kill("db2")
        before = (d.cli_json("leases"), d.cli_json("link", "ls"), d.container("db"), d.container("db2"))
        r = d.cli("move", "db", "db2", check=False)
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and "'db2' is not running" in r.stderr and "start 'db2'" in r.stderr
        assert (d.cli_json("leases"), d.cli_json("link", "ls"), d.container("db"), d.container("db2")) == before
        assert ask(d, "web", d.container("db")["ip"]) == "db"


def test_a_strategy_that_does_not_exist_stops_tether_fused_in_one_line(rootfs):
    d = Daemon(rootfs, strategy="teleport")
    try:
        p = subprocess.run([FUSED, "--config", str(d.config)], capture_output=True, text=True, timeout=30)
        assert p.returncode != 0
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "network.strategy" in lines[0] and "veth-move" in lines[0], p.stderr
    finally:
        d.close()


def test_a_handed_address_survives_kill_9_of_tether_fused_and_its_restart(rootfs, strategy):
    """Never break a running container: after a move, kill -9 and a restart
    (its reconcile) leave NEW answering at OLD's address."""
    with moved(rootfs, strategy) as (d, x):
        d.kill9("fused")
        assert ask(d, "web", x) == "db2"  # while it is down
        d.start()
        assert ask(d, "web", x) == "db2"
        assert d.container("db2")["answers"] == [x]
        assert "belongs to no running container" not in d.log.read_text()


def test_removing_new_gives_the_address_back_to_a_running_old(rootfs, strategy):
    with moved(rootfs, strategy) as (d, x):
        d.kill("db2")
        d.cli("rm", "db2")
        reaches(d, "web", x, "db")  # db ran all along, without its address since the move
        assert d.container("db")["ip"] == x and "db2 removed" in d.container("db")["note"]


def test_rebuild_store_finds_the_addresses_a_move_handed_over(rootfs, strategy):
    with moved(rootfs, strategy) as (d, x):
        d.stop()
        (d.state_dir / "tether.db").unlink()
        d.start(args=("--rebuild-store", "--runc-root", str(d.runc_root)))
        assert d.container("db2")["answers"] == [x]  # so x is given to nobody else
        assert ask(d, "web", x) == "db2"
        assert f"answering at {x} too" in d.log.read_text()
