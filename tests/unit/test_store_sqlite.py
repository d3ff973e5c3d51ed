"""The Store protocol (fused/store/base.py), one contract for both backends:
SQLite on a temporary file and the in-memory twin; then what only SQLite has
(file mode, schema, pragmas, a second connection, a locked file)."""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time

import pytest

from fused.model import Container, IpLease, Link, PortLease
from fused.store.base import ChangeSet, Conflict, Draft, StoreSnapshot, apply
from fused.store.memory import MemoryStore
from fused.store.sqlite import SCHEMA_VERSION, SqliteStore, StoreError


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = SqliteStore(tmp_path / "x.db") if request.param == "sqlite" else MemoryStore()
    yield s
    s.close()


def running(name: str, pid: int = 100, **kw) -> Container:
    return Container(name, kw.pop("cid", f"id-{name}"), "running", pid, 4026531000 + pid, f"/b/{name}", 1.0, 2.0,
                     None, "", ("80/tcp",), (), **kw)


def add(s, name: str, ip: str | None = None, **kw) -> StoreSnapshot:
    d = Draft(s.snapshot())
    d.put(running(name, **kw))
    if ip:
        d.put_ip_lease(IpLease(ip, name, f"02:74:{ip}", 3.0))
    return s.commit(d.change, d.snap.revision)


def link(d: Draft, consumer: str, alias: str, target: str, facade: str | None = None, group: str | None = None) -> Link:
    """A link to `target` in `group` (the target's name unless given)."""
    g = group or target
    d.put_group(g, target)
    d.put_link(Link(consumer, alias, facade, g))
    return Link(consumer, alias, facade, g)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# --- the contract ------------------------------------------------------------------


def test_an_empty_store_is_an_empty_snapshot(store):
    snap = store.snapshot()
    assert (snap.containers, snap.ip_leases, snap.port_leases, snap.links) == ({}, {}, {}, {})


def test_commit_returns_and_keeps_the_snapshot_after_it(store):
    before = store.snapshot()
    after = add(store, "db", ip="10.0.0.2", runtime=("runc", "--root", "/r"))
    assert after.revision == before.revision + 1
    assert store.snapshot() == after
    assert after.containers["db"] == running("db", runtime=("runc", "--root", "/r"))
    assert after.ip_leases == {"db": IpLease("10.0.0.2", "db", "02:74:10.0.0.2", 3.0)}
    assert before.containers == {}  # snapshots are values: the old one is unchanged


def test_a_commit_planned_on_an_older_revision_is_a_conflict_and_writes_nothing(store):
    snap = store.snapshot()
    add(store, "db")
    d = Draft(snap)
    d.put(running("web"))
    with pytest.raises(Conflict, match="plan again"):
        store.commit(d.change, snap.revision)
    assert set(store.snapshot().containers) == {"db"}


def test_every_record_kind_round_trips_and_deletes(store):
    add(store, "db", ip="10.0.0.2")
    add(store, "web", ip="10.0.0.3")
    d = Draft(store.snapshot())
    d.put_port_lease(PortLease(40000, "tcp", "db", 5432, 4.0))
    d.put_port_lease(PortLease(40000, "udp", "db", 53, 4.0))
    link(d, "web", "database", "db", "10.214.0.1")
    snap = store.commit(d.change, d.snap.revision)
    assert snap.port_leases == {
        (40000, "tcp"): PortLease(40000, "tcp", "db", 5432, 4.0),
        (40000, "udp"): PortLease(40000, "udp", "db", 53, 4.0),
    }
    assert snap.links == {("web", "database"): Link("web", "database", "10.214.0.1", "db")}
    assert snap.groups == {"db": "db"}
    d = Draft(snap)
    d.drop_port_lease(40000, "udp")
    link(d, "web", "database", "db2", "10.214.0.1")  # into another group: db's has no link left
    snap = store.commit(d.change, d.snap.revision)
    assert list(snap.port_leases) == [(40000, "tcp")]
    assert snap.links[("web", "database")] == Link("web", "database", "10.214.0.1", "db2")
    assert snap.groups == {"db2": "db2"}
    d = Draft(snap)
    d.put_group("db2", "db3")  # a move
    snap = store.commit(d.change, d.snap.revision)
    assert snap.groups == {"db2": "db3"}
    d = Draft(snap)
    d.delete_link("web", "database")
    snap = store.commit(d.change, d.snap.revision)
    assert snap.links == {} and snap.groups == {}


def test_an_address_changes_hands_in_one_change_set(store):
    add(store, "old", ip="10.0.0.2")
    add(store, "new")
    d = Draft(store.snapshot())
    d.drop_ip_lease("old")
    d.put_ip_lease(IpLease("10.0.0.2", "new", "02:74:x", 5.0))
    snap = store.commit(d.change, d.snap.revision)
    assert snap.ip_leases == {"new": IpLease("10.0.0.2", "new", "02:74:x", 5.0)}


def test_addresses_and_facades_swap_in_one_change_set_in_any_order(store):
    """An undo (base.inverse) puts leases back in whatever order: two names
    trading addresses, two links trading facades."""
    from fused.store.base import inverse

    add(store, "a", ip="10.0.0.2")
    add(store, "b", ip="10.0.0.3")
    d = Draft(store.snapshot())
    link(d, "a", "x", "b", "10.214.0.1")
    link(d, "a", "y", "b", "10.214.0.2")
    before = store.commit(d.change, d.snap.revision)
    ch = ChangeSet(
        ip_leases={"a": IpLease("10.0.0.3", "a", "m", 1.0), "b": IpLease("10.0.0.2", "b", "m", 1.0)},
        links={("a", "x"): Link("a", "x", "10.214.0.2", "b"), ("a", "y"): Link("a", "y", "10.214.0.1", "b")},
    )
    swapped = store.commit(ch, before.revision)
    assert swapped.ip_leases["a"].ip == "10.0.0.3"
    back = store.commit(inverse(before, ch), swapped.revision)
    assert (back.ip_leases, back.links) == (before.ip_leases, before.links)


def test_a_move_writes_its_groups_and_not_its_links(store, tmp_path):
    """A move rewrites the target of each group: the link records stay the
    same objects, and a fresh read gives back what was committed."""
    for n in ("t1", "t2", "c"):
        add(store, n)
    d = Draft(store.snapshot())
    for i in range(5):
        link(d, "c", f"s{i}", "t1", f"10.214.0.{i + 1}")
    link(d, "t2", "back", "t1", "10.214.0.9", "t1b")
    snap = store.commit(d.change, d.snap.revision)
    moved = store.commit(ChangeSet(groups={"t1": "t2", "t1b": "t2"}), snap.revision)
    assert moved.links is snap.links and moved.groups == {"t1": "t2", "t1b": "t2"}
    if isinstance(store, SqliteStore):
        fresh = SqliteStore(store.path)
        try:
            assert (fresh.snapshot().links, fresh.snapshot().groups) == (moved.links, moved.groups)
        finally:
            fresh.close()


def test_both_stores_refuse_a_link_in_no_group(store):
    add(store, "c")
    with pytest.raises((StoreError, sqlite3.IntegrityError)):
        store.commit(ChangeSet(links={("c", "x"): Link("c", "x", None, "nowhere")}), store.snapshot().revision)


def test_both_stores_refuse_a_lease_for_no_container(store):
    with pytest.raises((StoreError, sqlite3.IntegrityError)):
        store.commit(ChangeSet(ip_leases={"ghost": IpLease("10.0.0.9", "ghost", "m", 1.0)}), store.snapshot().revision)


def test_the_draft_refuses_two_names_on_one_address(store):
    add(store, "a", ip="10.0.0.2")
    add(store, "b")
    d = Draft(store.snapshot())
    with pytest.raises(StoreError, match="leased to 'a'"):
        d.put_ip_lease(IpLease("10.0.0.2", "b", "m", 1.0))


def test_deleting_a_container_takes_its_leases_and_links_with_it(store):
    add(store, "db", ip="10.0.0.2")
    add(store, "web", ip="10.0.0.3")
    d = Draft(store.snapshot())
    d.put_port_lease(PortLease(40000, "tcp", "db", 5432))
    link(d, "db", "x", "web")
    link(d, "web", "database", "db")
    store.commit(d.change, d.snap.revision)
    d = Draft(store.snapshot())
    d.delete("db")
    snap = store.commit(d.change, d.snap.revision)
    assert set(snap.containers) == {"web"} and set(snap.ip_leases) == {"web"} and snap.port_leases == {}
    assert list(snap.links) == [("web", "database")]  # a link *to* db stays: dangling
    assert snap.groups == {"db": "db"}  # and its group; db's own link's group went with it


def test_the_draft_sees_its_own_changes():
    base = StoreSnapshot(7, {"a": running("a")}, {}, {}, {})
    d = Draft(base)
    d.put(running("b"))
    d.update("a", note="x")
    link(d, "b", "a", "a")
    assert [c.name for c in d.containers()] == ["a", "b"]
    assert d.container("a").note == "x" and d.links("b") == [Link("b", "a", None, "a")] and d.groups() == {"a": "a"}
    assert base.containers == {"a": running("a")}  # the snapshot is untouched
    after = d.after()
    assert after.revision == 8 and after.containers["a"].note == "x"
    assert d.change.names() == {"a", "b"}


def test_apply_shares_untouched_tables():
    base = StoreSnapshot(1, {"a": running("a")}, {}, {(1, "tcp"): PortLease(1, "tcp", "a", 2)}, {})
    after = apply(base, ChangeSet(containers={"b": running("b")}))
    assert after.port_leases is base.port_leases and after.containers is not base.containers


def test_find_running_by_id(store):
    add(store, "db", cid="abc")
    d = Draft(store.snapshot())
    assert d.find_running_by_id("abc").name == "db" and d.find_running_by_id("zzz") is None


# --- SQLite only ---------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path):
    s = SqliteStore(tmp_path / "x.db")
    yield s
    s.close()


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
    SqliteStore(p).close()
    assert mode(p) == 0o600


def test_schema_version_row(sqlite_store):
    (v,) = sqlite_store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert int(v) == SCHEMA_VERSION == 4


# schema 3's links: a target on each link
LINKS_3 = """CREATE TABLE links (
    consumer TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
    alias    TEXT NOT NULL,
    target   TEXT NOT NULL,
    facade   TEXT UNIQUE,
    grp      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (consumer, alias)
);
"""


def schema_3() -> str:
    from fused.store import sqlite as mod

    return mod._SCHEMA[:mod._SCHEMA.index("CREATE TABLE groups")] + LINKS_3


def test_version_3_store_gets_one_target_per_group(tmp_path):
    """Each group keeps its name and its links' target; a link that did not
    agree with its group (never written by tether, but possible by hand),
    or had none, joins a group of its own target."""
    p = tmp_path / "x.db"
    db = sqlite3.connect(p)
    db.executescript(schema_3())
    db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    for n in ("web", "api"):
        db.execute("INSERT INTO containers (name, id, state, bundle, created_at) VALUES (?, ?, 'stopped', '', 1.0)", (n, n))
    db.executemany("INSERT INTO links VALUES (?, ?, ?, ?, ?)", [
        ("api", "db", "db2", "10.214.0.1", "db"),  # after `tether move db db2`
        ("web", "database", "db2", "10.214.0.2", "db"),
        ("web", "odd", "cache", "10.214.0.3", "db"),
        ("web", "old", "ns", None, ""),
    ])
    db.commit()
    db.close()
    s = SqliteStore(p)
    snap = s.snapshot()
    assert snap.groups == {"db": "db2", "db#1": "cache", "ns": "ns"}
    assert snap.links == {
        ("api", "db"): Link("api", "db", "10.214.0.1", "db"),
        ("web", "database"): Link("web", "database", "10.214.0.2", "db"),
        ("web", "odd"): Link("web", "odd", "10.214.0.3", "db#1"),
        ("web", "old"): Link("web", "old", None, "ns"),
    }
    (v,) = s.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert v == "4" and s.db.execute("PRAGMA foreign_key_check").fetchall() == []
    s.close()


def test_version_1_store_gains_the_runtime_column(tmp_path):
    """A store written by the previous release keeps its rows; each container's
    runtime is unknown (()) until it starts again."""
    p = tmp_path / "x.db"
    db = sqlite3.connect(p)

    v1 = schema_3().replace(",\n    runtime     TEXT NOT NULL DEFAULT '[]'", "").replace(
        ",\n    answers     TEXT NOT NULL DEFAULT '[]'", "")
    assert "runtime" not in v1 and "answers" not in v1
    db.executescript(v1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO containers (name, id, state, bundle, created_at) VALUES ('db', 'db', 'stopped', '', 1.0)")
    db.commit()
    db.close()
    s = SqliteStore(p)
    assert s.snapshot().containers["db"].runtime == () and s.snapshot().containers["db"].answers == ()
    d = Draft(s.snapshot())
    d.update("db", runtime=("runc", "--root", "/r"))
    s.commit(d.change, d.snap.revision)
    s.close()
    s = SqliteStore(p)
    assert s.snapshot().containers["db"].runtime == ("runc", "--root", "/r")
    (v,) = s.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert v == "4"
    s.close()


def test_version_2_store_gains_the_answers_column(tmp_path):
    p = tmp_path / "x.db"
    db = sqlite3.connect(p)

    db.executescript(schema_3().replace(",\n    answers     TEXT NOT NULL DEFAULT '[]'", ""))
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO containers (name, id, state, bundle, created_at) VALUES ('db2', 'db2', 'stopped', '', 1.0)")
    db.commit()
    db.close()
    s = SqliteStore(p)
    d = Draft(s.snapshot())
    d.update("db2", answers=("10.0.0.5",))
    s.commit(d.change, d.snap.revision)
    s.close()
    s = SqliteStore(p)
    assert s.snapshot().containers["db2"].answers == ("10.0.0.5",)
    s.close()


def test_wal_and_foreign_keys(sqlite_store):
    assert sqlite_store.db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert sqlite_store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


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


def test_reopen_keeps_data(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    snap = add(s, "db", ip="10.0.0.2")
    s.close()
    s2 = SqliteStore(p)
    try:
        assert s2.snapshot() == snap
    finally:
        s2.close()


def test_a_write_by_another_connection_is_read_again(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    add(s, "db")
    cached = s.snapshot()
    assert s.snapshot() is cached  # nothing changed: no read
    other = SqliteStore(p)
    add(other, "web")
    other.close()
    assert set(s.snapshot().containers) == {"db", "web"}
    s.close()


def test_a_bad_row_rolls_back_the_whole_change(sqlite_store):
    add(sqlite_store, "db")
    d = Draft(sqlite_store.snapshot())
    d.put(running("web"))
    d.put_port_lease(PortLease(1, "tcp", "nobody", 2))  # no such container: the foreign key refuses it
    with pytest.raises(sqlite3.IntegrityError):
        sqlite_store.commit(d.change, d.snap.revision)
    assert set(sqlite_store.snapshot().containers) == {"db"}
    assert set(SqliteStore(sqlite_store.path).snapshot().containers) == {"db"}


def test_state_is_checked(sqlite_store):
    d = Draft(sqlite_store.snapshot())
    d.put(Container("db", "id", "paused"))
    with pytest.raises(sqlite3.IntegrityError):
        sqlite_store.commit(d.change, d.snap.revision)


def test_a_locked_store_is_one_line_naming_the_file(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    holder = sqlite3.connect(p, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        d = Draft(s.snapshot())
        d.put(running("db"))
        with pytest.raises(StoreError) as ei:
            s.commit(d.change, d.snap.revision)
        msg = str(ei.value)
        assert "\n" not in msg and str(p) in msg and "locked by another process" in msg and "fuser" in msg
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert s.commit(d.change, d.snap.revision).containers["db"].name == "db"  # and it works once free
    s.close()


def test_concurrent_readers_see_whole_commits(tmp_path):
    p = tmp_path / "x.db"
    s = SqliteStore(p)
    r = SqliteStore(p)
    stop = threading.Event()
    seen = []

    def read():
        while not stop.is_set() or not seen:
            snap = r.snapshot()
            seen.append(len(snap.containers) == len(snap.ip_leases))

    t = threading.Thread(target=read)
    t.start()
    try:
        for i in range(30):
            add(s, f"c{i}", ip=f"10.0.0.{i + 2}")
            time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    assert seen and all(seen)
    assert len(r.snapshot().containers) == 30
    r.close()
    s.close()


# --- damage: found at open, one line, quarantined ---------------------------------------

from fused.store.sqlite import StoreDamaged, quarantine  # noqa: E402


def _filled(p):
    s = SqliteStore(p)
    for i in range(40):  # a few pages, so that a cut file really lacks some
        add(s, f"c{i}", ip=f"10.0.{i // 200}.{i % 200 + 2}")
    s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    return p


def _truncated(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p):
    p.write_bytes(os.urandom(8192))


def _zero_header(p):
    data = bytearray(p.read_bytes())
    data[:100] = bytes(100)
    p.write_bytes(bytes(data))


def _bad_row(p):
    db = sqlite3.connect(p)
    db.execute("UPDATE containers SET expose='{' WHERE name='c3'")
    db.commit()
    db.close()


def _bad_state_type(p):
    db = sqlite3.connect(p)
    db.execute("PRAGMA ignore_check_constraints=ON")
    db.execute("UPDATE containers SET pid='many' WHERE name='c4'")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_truncated, _garbage, _zero_header, _bad_row, _bad_state_type],
                         ids=["truncated", "garbage", "zeroed-header", "bad-json-row", "bad-typed-row"])
def test_a_damaged_store_is_one_line_at_open(tmp_path, damage):
    p = _filled(tmp_path / "x.db")
    damage(p)
    with pytest.raises(StoreDamaged) as ei:
        SqliteStore(p)
    msg = str(ei.value)
    assert msg.startswith(f"the store {p} is damaged (") and "\n" not in msg and "Traceback" not in msg


def test_a_missing_or_empty_store_is_a_new_one(tmp_path):
    p = tmp_path / "x.db"
    assert SqliteStore(p).created
    p2 = tmp_path / "y.db"
    p2.write_bytes(b"")
    assert SqliteStore(p2).created
    assert not SqliteStore(_filled(tmp_path / "z.db")).created


def test_quarantine_moves_the_store_and_its_wal_aside(tmp_path):
    p = _filled(tmp_path / "x.db")
    (tmp_path / "x.db-wal").write_bytes(b"w")
    dest = quarantine(p, now=1796283600)
    assert dest == tmp_path / "x.db.damaged-20261203T074000Z"
    assert dest.exists() and (tmp_path / "x.db.damaged-20261203T074000Z-wal").read_bytes() == b"w"
    assert not p.exists() and not (tmp_path / "x.db-wal").exists()
    p.write_bytes(b"again")
    assert quarantine(p, now=1796283600) == tmp_path / "x.db.damaged-20261203T074000Z-1"


def test_a_store_locked_at_open_is_not_damaged_and_stays_where_it_is(tmp_path):
    p = _filled(tmp_path / "x.db")
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as ei:
            SqliteStore(p)
        assert not isinstance(ei.value, StoreDamaged) and "\n" not in str(ei.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert SqliteStore(p).snapshot().containers  # the same, good file


def _null_ip(p):
    db = sqlite3.connect(p)
    db.execute("PRAGMA ignore_check_constraints=ON")
    db.execute("UPDATE ip_leases SET ip='not-an-address' WHERE name='c1'")
    db.commit()
    db.close()


def _orphan_lease(p):
    db = sqlite3.connect(p)  # foreign keys off, as any other writer has them by default
    db.execute("INSERT INTO port_leases VALUES (40000, 'tcp', 'ghost', 80, 1.0)")
    db.commit()
    db.close()


def _no_schema_version(p):
    db = sqlite3.connect(p)
    db.execute("DELETE FROM meta WHERE key='schema_version'")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_null_ip, _orphan_lease, _no_schema_version])
def test_every_table_is_checked_at_open(tmp_path, damage):
    p = _filled(tmp_path / "x.db")
    damage(p)
    with pytest.raises(StoreDamaged, match=r"is damaged \("):
        SqliteStore(p)


# --- a full disk ------------------------------------------------------------------------


def test_a_full_store_is_one_line_and_the_change_is_not_half_written(tmp_path):
    """SQLite's own "database or disk is full" (here: the file may not grow
    past its pages; on a full filesystem the same error): one line naming the
    store, the transaction rolled back, and it works again once there is room."""
    from fused.errors import StoreFull

    p = tmp_path / "x.db"
    s = SqliteStore(p)
    add(s, "db", ip="10.0.0.2")
    before = s.snapshot()
    (pages,) = s.db.execute("PRAGMA page_count").fetchone()
    s.db.execute(f"PRAGMA max_page_count={pages}")
    d = Draft(before)
    for i in range(200):  # more rows than the pages hold
        d.put(running(f"c{i}", cid="x" * 200))
    with pytest.raises(StoreFull) as ei:
        s.commit(d.change, d.snap.revision)
    line = str(ei.value)
    assert "\n" not in line and line.startswith("no space left on ") and f"for the store {p}: " in line
    assert line.endswith("free space there or move state_dir")
    assert not s.db.in_transaction and s.snapshot() is before
    assert set(SqliteStore(p).snapshot().containers) == {"db"}  # nothing of it on disk
    s.db.execute("PRAGMA max_page_count=1073741823")  # room again
    assert len(s.commit(d.change, d.snap.revision).containers) == 201
    s.close()


def test_an_io_error_is_a_full_disk_only_when_the_filesystem_is_full(tmp_path, monkeypatch):
    from fused.store import sqlite as sqlite_mod

    err = sqlite3.OperationalError("disk I/O error")
    err.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"  # the WAL index could not grow
    p = tmp_path / "x.db"
    monkeypatch.setattr(sqlite_mod, "_space_left", lambda path: 0)
    assert str(sqlite_mod.full_disk(p, err)).startswith("no space left on ")
    assert str(sqlite_mod.full_disk(p, OSError(28, "No space left on device"))).startswith("no space left on ")
    monkeypatch.setattr(sqlite_mod, "_space_left", lambda path: 10 << 30)
    assert sqlite_mod.full_disk(p, err) is None  # a real I/O error stays what it is
    assert sqlite_mod.full_disk(p, sqlite3.OperationalError("database is locked")) is None


def test_the_filesystem_named_is_the_one_under_the_store(tmp_path, monkeypatch):
    from fused.store import sqlite as sqlite_mod

    info = (
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "30 22 0:40 / /var/lib/tether rw - tmpfs tmpfs rw\n"
        "31 22 0:41 / /var/lib/tether2 rw - tmpfs other rw\n"
        "32 22 0:42 / /srv/with\\040space rw - xfs /dev/sdb1 rw\n"
    )
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/self/mountinfo":
            import io
            return io.StringIO(info)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(sqlite_mod.os.path, "realpath", lambda p: str(p))
    assert sqlite_mod._filesystem("/var/lib/tether") == ("tmpfs", "/var/lib/tether")
    assert sqlite_mod._filesystem("/var/lib/tether/x") == ("tmpfs", "/var/lib/tether")
    assert sqlite_mod._filesystem("/var/lib/tether2") == ("other", "/var/lib/tether2")
    assert sqlite_mod._filesystem("/var/lib/tetherx") == ("/dev/sda1", "/")
    assert sqlite_mod._filesystem("/srv/with space/db") == ("/dev/sdb1", "/srv/with space")
    assert str(sqlite_mod.no_space(sqlite_mod.Path("/var/lib/tether/tether.db"))) == (
        "no space left on tmpfs (/var/lib/tether) for the store /var/lib/tether/tether.db: "
        "free space there or move state_dir")
