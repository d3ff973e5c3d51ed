"""SQLite lease store (the Store protocol of base.py): WAL, BEGIN IMMEDIATE,
a schema version, mode 0600.

Only tether-fused writes it. `snapshot()` reads every table in one read
transaction into model's records, and is cached: tether-fused is the one
writer, so after a commit the next snapshot is the last one with the change
applied (base.apply), and the file is read again only when another
connection wrote to it (`PRAGMA data_version`). `commit()` writes a change
set in one `BEGIN IMMEDIATE` transaction, if the revision is still the one
it was planned on.

A full disk under the store (SQLite's SQLITE_FULL, or an I/O error while the
filesystem has no space left, as when the WAL index cannot grow) is
StoreFull: one line naming the filesystem and the store, and the
transaction rolled back, so nothing changed.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import time
from pathlib import Path

from ..allocator import undotted
from ..errors import StoreError, StoreFull
from ..model import Container, IpLease, Link, PortLease
from .base import ChangeSet, Conflict, StoreSnapshot, apply

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 2000  # well inside the hook's 10 s: a locked store is one clear line
LOW_SPACE = 1 << 20  # bytes: an I/O error with less than this left on the filesystem is a full disk

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE containers (
    name        TEXT PRIMARY KEY,
    id          TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('running', 'stopped')),
    pid         INTEGER,
    netns_ino   INTEGER,
    bundle      TEXT NOT NULL DEFAULT '',
    expose      TEXT NOT NULL DEFAULT '[]',
    publish     TEXT NOT NULL DEFAULT '[]',
    created_at  REAL NOT NULL,
    started_at  REAL,
    stopped_at  REAL,
    note        TEXT NOT NULL DEFAULT '',
    runtime     TEXT NOT NULL DEFAULT '[]',
    answers     TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX containers_id ON containers (id);
CREATE TABLE ip_leases (
    ip       TEXT PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE REFERENCES containers (name) ON DELETE CASCADE,
    mac      TEXT NOT NULL,
    since    REAL NOT NULL
);
CREATE TABLE port_leases (
    host_port INTEGER NOT NULL,
    proto     TEXT NOT NULL,
    name      TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
    port      INTEGER NOT NULL,
    since     REAL NOT NULL,
    PRIMARY KEY (host_port, proto)
);
CREATE INDEX port_leases_name ON port_leases (name, port, proto);
CREATE TABLE groups (
    grp      TEXT PRIMARY KEY,
    target   TEXT NOT NULL
);
CREATE TABLE links (
    consumer TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
    alias    TEXT NOT NULL,
    facade   TEXT UNIQUE,
    grp      TEXT NOT NULL REFERENCES groups (grp),
    PRIMARY KEY (consumer, alias)
);
"""
_LINKS = _SCHEMA[_SCHEMA.index("CREATE TABLE groups"):]


def _grouped(rows: list[tuple]) -> tuple[dict[str, str], list[tuple]]:
    """Schema 3's links (consumer, alias, target, facade, grp) as groups
    (grp -> target) and links (consumer, alias, facade, grp): a group keeps
    its name while its links go to one target (what tether wrote), a link
    that disagrees joins TARGET#n."""
    groups: dict[str, str] = {}
    links = []
    for consumer, alias, target, facade, grp in sorted(rows):
        base = g = grp or target
        n = 0
        while groups.setdefault(g, target) != target:
            n += 1
            g = f"{base}#{n}"
        links.append((consumer, alias, facade, g))
    return groups, links




def _json_tuple(text: str) -> tuple[str, ...]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {text[:40]!r}")
    return tuple(value)


def _container(r: tuple) -> Container:
    name, cid, state, pid, ino = r[:5]
    if not isinstance(name, str) or not isinstance(cid, str) or state not in ("running", "stopped"):
        raise ValueError(f"container row {str(name)[:40]!r} is not a container")
    if not all(v is None or isinstance(v, int) for v in (pid, ino)):
        raise ValueError(f"container {name!r}: pid or netns not a number")
    try:
        lists = [_json_tuple(t) for t in r[10:14]]
    except ValueError as e:
        raise ValueError(f"container {name!r}: expose, publish, runtime or answers: {e}") from None
    return Container(*r[:10], *lists)


HEADER = b"SQLite format 3\x00"
TABLES = {"meta", "containers", "ip_leases", "port_leases", "groups", "links"}


class StoreDamaged(StoreError):
    """The file is there but is no readable tether store."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"the store {path} is damaged ({reason})")
        self.path = path
        self.reason = reason


def quarantine(path: Path, now: float | None = None) -> Path:
    """Move a damaged store (and its -wal and -shm) aside, named with the
    time: it is kept for a post-mortem, never read again."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    dest = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(dest) + suffix))
    return dest


def _filesystem(path: Path) -> tuple[str, str]:
    """(source, mount point) of the filesystem `path` is on, from mountinfo:
    the top mount of the longest mount point above it."""
    target = os.path.realpath(path)
    found = ("?", "/")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 5 or len(tail) < 2:
                    continue
                mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(found[1]):
                    found = (tail[1], mount)
    except OSError:
        pass
    return found


def _space_left(path: Path) -> int | None:
    """Bytes root may still write on the filesystem of `path` (None: unknown);
    0 as well when it has no inode left."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_files and not st.f_ffree:
        return 0
    return st.f_bfree * st.f_frsize


def no_space(path: Path) -> StoreFull:
    source, mount = _filesystem(path.parent)
    where = source if source == mount else f"{source} ({mount})"
    return StoreFull(f"no space left on {where} for the store {path}: free space there or move state_dir")


def full_disk(path: Path, e: BaseException) -> StoreFull | None:
    """`e` as the one line of a full disk under the store at `path`, or None
    when it is something else."""
    if isinstance(e, OSError):
        return no_space(path) if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
    name = getattr(e, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        return no_space(path)
    if name.startswith("SQLITE_IOERR") or "disk I/O error" in str(e):
        # SQLite says "disk I/O error" where a write or the WAL index's growth
        # failed: on a filesystem with no space left, that is the cause
        left = _space_left(path.parent)
        if left is not None and left < LOW_SPACE:
            return no_space(path)
    return None


def _ip_lease(r: tuple) -> IpLease:
    ip, name, mac, since = r
    if undotted(ip) is None or not isinstance(name, str) or not isinstance(mac, str) or not isinstance(since, (int, float)):
        raise ValueError(f"address lease {str(ip)[:40]!r} of {str(name)[:40]!r} is not an address lease")
    return IpLease(ip, name, mac, since)


def _port_lease(r: tuple) -> PortLease:
    hp, proto, name, port, since = r
    if not all(isinstance(x, int) and 0 < x < 65536 for x in (hp, port)) or proto not in ("tcp", "udp") \
            or not isinstance(name, str) or not isinstance(since, (int, float)):
        raise ValueError(f"host port lease {str(hp)[:20]!r}/{str(proto)[:10]!r} is not a port lease")
    return PortLease(hp, proto, name, port, since)


def _link(r: tuple) -> Link:
    consumer, alias, facade, grp = r
    if not all(isinstance(x, str) for x in (consumer, alias, grp)) or not (facade is None or undotted(facade) is not None):
        raise ValueError(f"link {str(consumer)[:40]!r}:{str(alias)[:40]!r} is not a link")
    return Link(consumer, alias, facade, grp)


def _group(r: tuple) -> tuple[str, str]:
    if not all(isinstance(x, str) for x in r):
        raise ValueError(f"link group {str(r[0])[:40]!r} is not a group")
    return r


class SqliteStore:
    """`created`: the file was absent or empty (a new store), which the
    daemon must not take for "no containers" while some are wired."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        self.created = size == 0
        if size:
            with open(self.path, "rb") as f:
                head = f.read(100)
            if len(head) < 100 or not head.startswith(HEADER):
                raise StoreDamaged(self.path, "it is not an SQLite database: its header is wrong or cut short")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise full_disk(self.path, e) or e from None
        os.close(fd)
        os.chmod(self.path, 0o600)
        # used by one thread at a time: tether-fused's store thread (store/thread.py)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._snap: StoreSnapshot | None = None
        self._data_version: int | None = None
        try:
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._guarded(self._pragmas)
            self._guarded(self._migrate)
            self._guarded(self._check)
        except sqlite3.DatabaseError as e:
            self.db.close()
            if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or type(e) is sqlite3.DatabaseError:
                raise StoreDamaged(self.path, f"SQLite: {e}") from None
            # locked, I/O, a full disk: the file may be fine; never quarantined
            raise StoreError(f"cannot open the store {self.path}: SQLite: {e}: see `tether doctor`") from None
        except StoreError:
            self.db.close()
            raise
        for suffix in ("-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)

    def _pragmas(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")

    def _check(self) -> None:
        """Integrity, schema and every row, once at open: a damaged store is
        found here, never halfway through a request."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise StoreDamaged(self.path, f"integrity check: {'; '.join(problems)[:200]}")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if missing := TABLES - tables:
            raise StoreDamaged(self.path, f"tables missing: {', '.join(sorted(missing))}")
        if orphan := self.db.execute("PRAGMA foreign_key_check").fetchone():
            raise StoreDamaged(self.path, f"a row of {orphan[0]} refers to a container that is not there")
        try:
            self._snapshot()
        except (ValueError, TypeError) as e:
            raise StoreDamaged(self.path, f"a row does not parse: {e}") from None

    @property
    def where(self) -> str:
        """The store, as a line that says what a request waited for names it."""
        return f"the store {self.path}"

    def close(self) -> None:
        self.db.close()

    def _guarded(self, fn, *args):
        """fn(*args), with SQLite's lock errors and a full disk as one line
        naming the file."""
        try:
            return fn(*args)
        except (sqlite3.OperationalError, OSError) as e:
            if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
                raise StoreError(
                    f"the store {self.path} is locked by another process (waited {BUSY_TIMEOUT_MS / 1000:g} s): "
                    f"find it with `fuser -v {self.path}` and stop it; only tether-fused may write the store"
                ) from None
            if (full := full_disk(self.path, e)) is not None:
                raise full from None
            raise

    def _end(self, how: str) -> None:
        """COMMIT or ROLLBACK the open transaction, if SQLite has not rolled
        it back itself (it does on a full disk: a ROLLBACK then would fail,
        and hide why)."""
        if self.db.in_transaction:
            self.db.execute(how)

    def _migrate(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            has_meta = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            if not has_meta:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            else:
                row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None or not str(row[0]).isdigit():
                    raise StoreDamaged(self.path, "its schema version is missing or not a number")
                (v,) = row
                if int(v) > SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.path} has schema version {v}, newer than this tether ({SCHEMA_VERSION}): "
                        "upgrade tether"
                    )
                if int(v) < 2:  # 1 -> 2: the runtime that started each container
                    self.db.execute("ALTER TABLE containers ADD COLUMN runtime TEXT NOT NULL DEFAULT '[]'")
                if int(v) < 3:  # 2 -> 3: the addresses a container answers at for others (a move)
                    self.db.execute("ALTER TABLE containers ADD COLUMN answers TEXT NOT NULL DEFAULT '[]'")
                if int(v) < 4:  # 3 -> 4: a target per link group, not per link (a move writes one row per group)
                    groups, links = _grouped(self.db.execute("SELECT consumer, alias, target, facade, grp FROM links").fetchall())
                    self.db.execute("ALTER TABLE links RENAME TO links_3")
                    for stmt in _LINKS.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.executemany("INSERT INTO groups (grp, target) VALUES (?, ?)", list(groups.items()))
                    self.db.executemany("INSERT INTO links (consumer, alias, facade, grp) VALUES (?, ?, ?, ?)", links)
                    self.db.execute("DROP TABLE links_3")
                if int(v) < SCHEMA_VERSION:
                    self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
            self.db.execute("COMMIT")
        except BaseException:
            self._end("ROLLBACK")
            raise

    # --- reading ----------------------------------------------------------------
    def snapshot(self) -> StoreSnapshot:
        return self._guarded(self._snapshot)

    def _snapshot(self) -> StoreSnapshot:
        (version,) = self.db.execute("PRAGMA data_version").fetchone()
        if self._snap is not None and version == self._data_version:
            return self._snap
        self.db.execute("BEGIN")
        try:
            snap = self._read()
            (self._data_version,) = self.db.execute("PRAGMA data_version").fetchone()
        finally:
            self._end("COMMIT")
        self._snap = snap
        return snap

    def _read(self) -> StoreSnapshot:
        (rev,) = self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        containers = {
            r[0]: _container(r)
            for r in self.db.execute(
                "SELECT name, id, state, pid, netns_ino, bundle, created_at, started_at, stopped_at, note, "
                "expose, publish, runtime, answers FROM containers"
            )
        }
        ips = {r[1]: _ip_lease(r) for r in self.db.execute("SELECT ip, name, mac, since FROM ip_leases")}
        ports = {
            (r[0], r[1]): _port_lease(r)
            for r in self.db.execute("SELECT host_port, proto, name, port, since FROM port_leases")
        }
        links = {(r[0], r[1]): _link(r) for r in self.db.execute("SELECT consumer, alias, facade, grp FROM links")}
        groups = dict(_group(r) for r in self.db.execute("SELECT grp, target FROM groups"))
        return StoreSnapshot(int(rev), containers, ips, ports, links, groups)

    # --- writing ----------------------------------------------------------------
    def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        return self._guarded(self._commit, change, revision)

    def _commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        before = self._snapshot()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self.db.execute("PRAGMA data_version").fetchone()
            (rev,) = self.db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
            if int(rev) != revision:
                raise Conflict(f"the store is at revision {rev}, not {revision}: plan again")
            self._write(change)
            self.db.execute("UPDATE meta SET value=? WHERE key='revision'", (str(revision + 1),))
            self.db.execute("COMMIT")  # a COMMIT that fails (a full disk) leaves it open or rolled back: never half
        except BaseException:
            self._end("ROLLBACK")
            raise
        if before.revision == revision and version == self._data_version:  # nobody else wrote: no read
            self._snap = apply(before, change, revision + 1)
            return self._snap
        self._snap = None
        return self._snapshot()

    def _write(self, ch: ChangeSet) -> None:
        """Containers and groups first (leases and links refer to them);
        every touched lease and link is deleted, then the new values inserted
        (an address or a facade may change hands among them, in any order);
        groups no link is in, and removed containers, last (their leases and
        links go with them). Batched: statements per table, not per record.
        A move writes its groups' rows, not its links'."""
        many = self.db.executemany
        many(
            """INSERT INTO containers (name, id, state, pid, netns_ino, bundle, created_at, started_at,
                                       stopped_at, note, expose, publish, runtime, answers)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET id=excluded.id, state=excluded.state, pid=excluded.pid,
                   created_at=excluded.created_at,
                   netns_ino=excluded.netns_ino, bundle=excluded.bundle, started_at=excluded.started_at,
                   stopped_at=excluded.stopped_at, note=excluded.note, expose=excluded.expose,
                   publish=excluded.publish, runtime=excluded.runtime, answers=excluded.answers""",
            [
                (c.name, c.id, c.state, c.pid, c.netns_ino, c.bundle, c.created_at, c.started_at, c.stopped_at,
                 c.note, json.dumps(list(c.expose)), json.dumps(list(c.publish)), json.dumps(list(c.runtime)),
                 json.dumps(list(c.answers)))
                for c in ch.containers.values() if c is not None
            ],
        )
        many("INSERT INTO groups (grp, target) VALUES (?, ?) ON CONFLICT (grp) DO UPDATE SET target=excluded.target",
             [(g, t) for g, t in ch.groups.items() if t is not None])
        many("DELETE FROM links WHERE consumer=? AND alias=?", list(ch.links))
        many("DELETE FROM port_leases WHERE host_port=? AND proto=?", list(ch.port_leases))
        many("DELETE FROM ip_leases WHERE name=?", [(name,) for name in ch.ip_leases])
        many("INSERT INTO ip_leases (ip, name, mac, since) VALUES (?, ?, ?, ?)",
             [(l.ip, l.name, l.mac, l.since) for l in ch.ip_leases.values() if l is not None])
        many("INSERT INTO port_leases (host_port, proto, name, port, since) VALUES (?, ?, ?, ?, ?)",
             [(l.host_port, l.proto, l.name, l.port, l.since) for l in ch.port_leases.values() if l is not None])
        many("INSERT INTO links (consumer, alias, facade, grp) VALUES (?, ?, ?, ?)",
             [(l.consumer, l.alias, l.facade, l.group) for l in ch.links.values() if l is not None])
        many("DELETE FROM groups WHERE grp=?", [(g,) for g, t in ch.groups.items() if t is None])
        many("DELETE FROM containers WHERE name=?", [(name,) for name, c in ch.containers.items() if c is None])
