"""fused.store.sqlite: the lease store on a temporary file."""
from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from fused.store.sqlite import SCHEMA_VERSION, ContainerRow, SqliteStore, StoreError


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "x.db")
    yield s
    s.close()


def add(s: SqliteStore, name: str, cid: str | None = None, pid: int = 100, ip: str | None = None) -> None:
    with s.transaction():
        s.upsert_running(name, cid or f"id-{name}", pid, 4026531000 + pid, f"/b/{name}", ["80/tcp"], [])
        if ip:
            s.set_ip_lease(name, ip, f"02:74:{ip}")


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# --- file, schema, pragmas ---------------------------------------------------


def test_file_mode_is_0600_even_with_a_lax_umask(tmp_path):
    old = os.umask(0o000)
    try:
        s = SqliteStore(tmp_path / "sub" / "x.db")
        add(s, "db", ip="10.0.0.2")
    finally:
        os.umask(old)
    try:
        assert mode(tmp_path / "sub" / "x.db") == 0o600
        wal = tmp_path / "sub" / "x.db-wal"
        if wal.exists():
            assert mode(wal) & 0o077 == 0
        assert mode(tmp_path / "sub") == 0o700
    finally:
        s.close()


def test_existing_file_is_tightened_to_0600(tmp_path):
    p = tmp_path / "x.db"
    p.touch(mode=0o644)
    os.chmod(p, 0o644)
    s = SqliteStore(p)
    s.close()
    assert mode(p) == 0o600


def test_schema_version_row(store):
    (v,) = store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert int(v) == SCHEMA_VERSION == 2


def test_version_1_store_gains_the_runtime_column(tmp_path):
    """A store written by the previous release keeps its rows; each container's
    runtime is unknown ([]) until it starts again."""
    p = tmp_path / "x.db"
    db = sqlite3.connect(p)
    from fused.store import sqlite as mod

    v1 = mod._SCHEMA.replace(",\n    runtime     TEXT NOT NULL DEFAULT '[]'", "")
    assert "runtime" not in v1
    db.executescript(v1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO containers (name, id, state, bundle, created_at) VALUES ('db', 'db', 'stopped', '', 1.0)")
    db.commit()
    db.close()
    s = SqliteStore(p)
    assert s.get("db").runtime == []
    with s.transaction():
        s.upsert_running("db", "db", 1, 2, "/b", [], [], ["runc", "--root", "/r"])
    assert s.get("db").runtime == ["runc", "--root", "/r"]
    (v,) = s.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert v == "2"
    s.close()


def test_wal_and_foreign_keys(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_newer_schema_version_is_refused(tmp_path):
    p = tmp_path / "x.db"
    SqliteStore(p).close()
    db = sqlite3.connect(p)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(StoreError) as ei:
        SqliteStore(p)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(ei.value)
    assert "upgrade tether" in str(ei.value)


def test_reopen_keeps_data_and_does_not_recreate_schema(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    add(s, "db", ip="10.0.0.2")
    with s.transaction():
        s.mark_stopped("db", when=1234.5)
    s.close()
    s2 = SqliteStore(p)
    try:
        row = s2.get("db")
        assert row is not None
        assert (row.state, row.ip, row.stopped_at, row.expose) == ("stopped", "10.0.0.2", 1234.5, ["80/tcp"])
        assert s2.db.execute("SELECT count(*) FROM meta").fetchone()[0] == 1
    finally:
        s2.close()


# --- transactions ------------------------------------------------------------


def test_rollback_on_exception_leaves_nothing(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            store.upsert_running("db", "id1", 10, 1, "/b", [], [])
            store.set_ip_lease("db", "10.0.0.2", "m")
            assert store.get("db") is not None  # visible inside
            raise RuntimeError("boom")
    assert store.get("db") is None
    assert store.containers() == []
    assert store.ip_holders() == []
    assert store.leases() == []
    # the store is usable afterwards
    add(store, "db")
    assert store.get("db").state == "running"


def test_rollback_keeps_earlier_commits(store):
    add(store, "a", ip="10.0.0.2")
    with pytest.raises(KeyError):
        with store.transaction():
            store.mark_stopped("a", when=1.0)
            store.drop_ip_lease("a")
            raise KeyError("x")
    row = store.get("a")
    assert row.state == "running" and row.ip == "10.0.0.2"


def test_nested_transaction_is_refused_and_rolls_back_the_outer(store):
    with pytest.raises(StoreError, match="nested"):
        with store.transaction():
            store.upsert_running("db", "id1", 10, 1, "/b", [], [])
            with store.transaction():
                pass
    assert store.get("db") is None
    with store.transaction():  # not stuck in "in transaction"
        store.upsert_running("db", "id1", 10, 1, "/b", [], [])
    assert store.get("db") is not None


def test_changes_are_visible_to_a_second_connection_after_commit(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    try:
        add(s, "db", ip="10.0.0.2")
        other = sqlite3.connect(p)
        assert other.execute("SELECT ip, name FROM ip_leases").fetchall() == [("10.0.0.2", "db")]
        other.close()
    finally:
        s.close()


# --- containers and leases ---------------------------------------------------


def test_upsert_running_then_get(store):
    add(store, "db", cid="abc", pid=77, ip="10.0.0.9")
    row = store.get("db")
    assert isinstance(row, ContainerRow)
    assert row.running
    assert (row.name, row.id, row.pid, row.netns_ino, row.bundle) == ("db", "abc", 77, 4026531077, "/b/db")
    assert (row.ip, row.mac) == ("10.0.0.9", "02:74:10.0.0.9")
    assert row.expose == ["80/tcp"] and row.publish == []
    assert row.stopped_at is None and row.started_at is not None
    assert row.created_at <= row.started_at
    assert store.get("nope") is None


def test_mark_stopped_keeps_leases_and_records_time(store):
    add(store, "db", ip="10.0.0.2")
    with store.transaction():
        store.mark_stopped("db", when=42.0)
    row = store.get("db")
    assert (row.state, row.pid, row.netns_ino, row.stopped_at, row.ip) == ("stopped", None, None, 42.0, "10.0.0.2")
    assert not row.running
    assert store.ip_holders() == [("10.0.0.2", "db", False, 42.0)]


def test_restart_clears_stopped_at_and_keeps_created_at(store):
    add(store, "db", cid="one", pid=1, ip="10.0.0.2")
    created = store.get("db").created_at
    with store.transaction():
        store.mark_stopped("db", when=5.0)
    add(store, "db", cid="two", pid=2)
    row = store.get("db")
    assert (row.state, row.id, row.pid, row.stopped_at, row.ip) == ("running", "two", 2, None, "10.0.0.2")
    assert row.created_at == created
    assert len(store.containers()) == 1


def test_set_ip_lease_moves_a_name_to_a_new_address(store):
    add(store, "db", ip="10.0.0.2")
    with store.transaction():
        store.set_ip_lease("db", "10.0.0.3", "m3")
    assert store.ip_holders() == [("10.0.0.3", "db", True, None)]
    assert store.get("db").mac == "m3"


def test_set_ip_lease_same_address_is_idempotent(store):
    add(store, "db", ip="10.0.0.2")
    since = store.db.execute("SELECT since FROM ip_leases").fetchone()[0]
    with store.transaction():
        store.set_ip_lease("db", "10.0.0.2", "02:74:10.0.0.2")
    assert store.db.execute("SELECT ip, name, since FROM ip_leases").fetchall() == [("10.0.0.2", "db", since)]


def test_never_two_names_on_one_address(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b")
    with pytest.raises(StoreError) as ei:
        with store.transaction():
            store.set_ip_lease("b", "10.0.0.2", "mb")
    assert "10.0.0.2" in str(ei.value) and "'a'" in str(ei.value)
    # the holder keeps it: the caller must evict first
    assert store.ip_holders() == [("10.0.0.2", "a", True, None)]
    assert store.get("b").ip is None


def test_refused_lease_rolls_back_the_whole_transaction(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b", ip="10.0.0.3")
    with pytest.raises(StoreError):
        with store.transaction():
            store.set_note("b", "moving")
            store.set_ip_lease("b", "10.0.0.2", "mb")
    # b keeps its old address and note: nothing of the failed move remains
    assert sorted(store.ip_holders()) == [("10.0.0.2", "a", True, None), ("10.0.0.3", "b", True, None)]
    assert store.get("b").note in ("", None)


def test_refused_lease_to_a_stopped_holder_too(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b")
    with store.transaction():
        store.mark_stopped("a", when=1.0)
    with pytest.raises(StoreError):
        with store.transaction():
            store.set_ip_lease("b", "10.0.0.2", "mb")
    assert store.ip_holders() == [("10.0.0.2", "a", False, 1.0)]


def test_drop_ip_lease_then_reassign(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b")
    with store.transaction():
        store.mark_stopped("a", when=1.0)
        store.drop_ip_lease("a")
        store.set_ip_lease("b", "10.0.0.2", "mb")
        store.set_note("a", "evicted")
    assert store.ip_holders() == [("10.0.0.2", "b", True, None)]
    a = store.get("a")
    assert (a.ip, a.note, a.state) == (None, "evicted", "stopped")


def test_delete_cascades_to_ip_and_port_leases_and_links(store):
    add(store, "db", ip="10.0.0.2")
    add(store, "web", ip="10.0.0.3")
    with store.transaction():
        store.db.execute("INSERT INTO port_leases VALUES (30000, 'tcp', 'db', 5432, 1.0)")
        store.db.execute("INSERT INTO links VALUES ('db', 'x', 'web', NULL, 'web')")
    with store.transaction():
        store.delete("db")
    assert store.get("db") is None
    assert store.ip_holders() == [("10.0.0.3", "web", True, None)]
    assert store.db.execute("SELECT count(*) FROM port_leases").fetchone()[0] == 0
    assert store.db.execute("SELECT count(*) FROM links").fetchone()[0] == 0
    assert [c.name for c in store.containers()] == ["web"]


def test_lease_for_unknown_container_is_refused(store):
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.set_ip_lease("ghost", "10.0.0.2", "m")
    assert store.ip_holders() == []


def test_ip_holders_lists_every_lease(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b", ip="10.0.0.3")
    add(store, "c")  # no lease
    with store.transaction():
        store.mark_stopped("b", when=9.5)
    assert sorted(store.ip_holders()) == [("10.0.0.2", "a", True, None), ("10.0.0.3", "b", False, 9.5)]


def test_leases_listing(store):
    add(store, "web", ip="10.0.0.3")
    add(store, "db", ip="10.0.0.2")
    with store.transaction():
        store.db.execute("INSERT INTO port_leases VALUES (30001, 'udp', 'db', 53, 7.0)")
        store.mark_stopped("db", when=8.0)
    got = store.leases()
    assert [(x["kind"], x["lease"], x["maps"], x["name"], x["state"], x["stopped_at"]) for x in got] == [
        ("ip", "10.0.0.2", None, "db", "stopped", 8.0),
        ("ip", "10.0.0.3", None, "web", "running", None),
        ("port", "30001", "udp:53", "db", "stopped", 8.0),
    ]
    assert all(isinstance(x["since"], float) for x in got)


def test_find_running_by_id(store):
    add(store, "a", cid="same")
    add(store, "b", cid="other")
    assert store.find_running_by_id("same").name == "a"
    assert store.find_running_by_id("missing") is None
    with store.transaction():
        store.mark_stopped("a", when=1.0)
    assert store.find_running_by_id("same") is None
    assert store.find_running_by_id("other").name == "b"


def test_containers_sorted_by_name(store):
    for n in ("web", "db", "cache"):
        add(store, n)
    assert [c.name for c in store.containers()] == ["cache", "db", "web"]


def test_state_is_checked(store):
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.db.execute(
                "INSERT INTO containers (name, id, state, created_at) VALUES ('x', 'x', 'paused', 0)"
            )
    assert store.get("x") is None
