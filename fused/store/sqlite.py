"""SQLite lease store: WAL, BEGIN IMMEDIATE, a schema version, mode 0600.

Only tether-fused opens it for writing. Every change happens inside
`transaction()`; a failure anywhere inside rolls everything back.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 2

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
    runtime     TEXT NOT NULL DEFAULT '[]'
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
CREATE TABLE links (
    consumer TEXT NOT NULL REFERENCES containers (name) ON DELETE CASCADE,
    alias    TEXT NOT NULL,
    target   TEXT NOT NULL,
    facade   TEXT UNIQUE,
    grp      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (consumer, alias)
);
"""


class StoreError(Exception):
    pass


@dataclass
class ContainerRow:
    name: str
    id: str
    state: str
    pid: int | None
    netns_ino: int | None
    bundle: str
    created_at: float
    started_at: float | None
    stopped_at: float | None
    note: str
    ip: str | None = None
    mac: str | None = None
    expose: list[str] = field(default_factory=list)
    publish: list[str] = field(default_factory=list)
    # the command that lists it: the runtime that started it and its state root,
    # e.g. ["/usr/sbin/runc", "--root", "/run/runc"] ([] when unknown)
    runtime: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.state == "running"


_CONTAINER_SELECT = """
SELECT c.name, c.id, c.state, c.pid, c.netns_ino, c.bundle, c.created_at, c.started_at,
       c.stopped_at, c.note, l.ip, l.mac, c.expose, c.publish, c.runtime
FROM containers c LEFT JOIN ip_leases l ON l.name = c.name
"""


def _row(r: tuple) -> ContainerRow:
    return ContainerRow(*r[:12], expose=json.loads(r[12]), publish=json.loads(r[13]), runtime=json.loads(r[14]))


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._in_txn = False
        self._migrate()
        for suffix in ("-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction():
            has_meta = self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if not has_meta:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            (v,) = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if int(v) > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {v}, newer than this tether ({SCHEMA_VERSION}): "
                    "upgrade tether"
                )
            if int(v) < 2:  # 1 -> 2: the runtime that started each container
                self.db.execute("ALTER TABLE containers ADD COLUMN runtime TEXT NOT NULL DEFAULT '[]'")
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        if self._in_txn:
            raise StoreError("nested transaction")
        self.db.execute("BEGIN IMMEDIATE")
        self._in_txn = True
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._in_txn = False

    # --- containers -------------------------------------------------------
    def get(self, name: str) -> ContainerRow | None:
        r = self.db.execute(_CONTAINER_SELECT + " WHERE c.name = ?", (name,)).fetchone()
        return _row(r) if r else None

    def find_running_by_id(self, cid: str) -> ContainerRow | None:
        r = self.db.execute(_CONTAINER_SELECT + " WHERE c.id = ? AND c.state = 'running'", (cid,)).fetchone()
        return _row(r) if r else None

    def containers(self) -> list[ContainerRow]:
        return [_row(r) for r in self.db.execute(_CONTAINER_SELECT + " ORDER BY c.name")]

    def upsert_running(
        self,
        name: str,
        cid: str,
        pid: int,
        netns_ino: int,
        bundle: str,
        expose: list[str],
        publish: list[str],
        runtime: list[str] = (),
    ) -> None:
        now = time.time()
        self.db.execute(
            """INSERT INTO containers (name, id, state, pid, netns_ino, bundle, expose, publish,
                                       created_at, started_at, runtime)
               VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET id=excluded.id, state='running', pid=excluded.pid,
                   netns_ino=excluded.netns_ino, bundle=excluded.bundle, expose=excluded.expose,
                   publish=excluded.publish, started_at=excluded.started_at, stopped_at=NULL,
                   runtime=excluded.runtime""",
            (name, cid, pid, netns_ino, bundle, json.dumps(expose), json.dumps(publish), now, now, json.dumps(list(runtime))),
        )

    def mark_stopped(self, name: str, when: float | None = None) -> None:
        self.db.execute(
            "UPDATE containers SET state='stopped', pid=NULL, netns_ino=NULL, stopped_at=? WHERE name=?",
            (when if when is not None else time.time(), name),
        )

    def set_note(self, name: str, note: str) -> None:
        self.db.execute("UPDATE containers SET note=? WHERE name=?", (note, name))

    def delete(self, name: str) -> None:
        self.db.execute("DELETE FROM containers WHERE name=?", (name,))

    # --- ip leases --------------------------------------------------------
    def ip_holders(self) -> list[tuple[str, str, bool, float | None]]:
        """(ip, name, running, stopped_at) for every address lease."""
        return [
            (ip, name, state == "running", stopped_at)
            for ip, name, state, stopped_at in self.db.execute(
                "SELECT l.ip, l.name, c.state, c.stopped_at FROM ip_leases l JOIN containers c USING (name)"
            )
        ]

    def set_ip_lease(self, name: str, ip: str, mac: str) -> None:
        holder = self.db.execute("SELECT name FROM ip_leases WHERE ip=?", (ip,)).fetchone()
        if holder and holder[0] != name:
            raise StoreError(f"address {ip} is leased to {holder[0]!r}: evict it first")
        self.db.execute("DELETE FROM ip_leases WHERE name=? AND ip<>?", (name, ip))
        if not holder:
            self.db.execute("INSERT INTO ip_leases (ip, name, mac, since) VALUES (?, ?, ?, ?)", (ip, name, mac, time.time()))

    def drop_ip_lease(self, name: str) -> None:
        self.db.execute("DELETE FROM ip_leases WHERE name=?", (name,))

    # --- links --------------------------------------------------------------
    _LINK_COLS = "consumer, alias, target, facade, grp"

    def links(self, consumer: str | None = None) -> list[tuple[str, str, str, str | None, str]]:
        """(consumer, alias, target, facade, group), sorted."""
        q = f"SELECT {self._LINK_COLS} FROM links"
        if consumer:
            return list(self.db.execute(q + " WHERE consumer=? ORDER BY 1, 2", (consumer,)))
        return list(self.db.execute(q + " ORDER BY 1, 2"))

    def get_link(self, consumer: str, alias: str) -> tuple[str, str, str, str | None, str] | None:
        return self.db.execute(
            f"SELECT {self._LINK_COLS} FROM links WHERE consumer=? AND alias=?", (consumer, alias)
        ).fetchone()

    def add_link(self, consumer: str, alias: str, target: str, facade: str | None, grp: str) -> None:
        self.db.execute(
            "INSERT INTO links (consumer, alias, target, facade, grp) VALUES (?, ?, ?, ?, ?)",
            (consumer, alias, target, facade, grp),
        )

    def set_link_target(self, consumer: str, alias: str, target: str, grp: str) -> None:
        self.db.execute("UPDATE links SET target=?, grp=? WHERE consumer=? AND alias=?", (target, grp, consumer, alias))

    def move_links(self, old: str, new: str) -> int:
        """Every link targeting `old` now targets `new` (groups unchanged)."""
        return self.db.execute("UPDATE links SET target=? WHERE target=?", (new, old)).rowcount

    def delete_link(self, consumer: str, alias: str) -> None:
        self.db.execute("DELETE FROM links WHERE consumer=? AND alias=?", (consumer, alias))

    def facades(self) -> set[str]:
        return {f for (f,) in self.db.execute("SELECT facade FROM links WHERE facade IS NOT NULL")}

    def group_targets(self, grp: str) -> set[str]:
        return {t for (t,) in self.db.execute("SELECT DISTINCT target FROM links WHERE grp=?", (grp,))}

    # --- port leases ----------------------------------------------------------
    def port_leases(self, name: str | None = None) -> list[tuple[int, str, str, int]]:
        """(host_port, proto, name, port), by host port."""
        q = "SELECT host_port, proto, name, port FROM port_leases"
        if name:
            return list(self.db.execute(q + " WHERE name=? ORDER BY 1, 2", (name,)))
        return list(self.db.execute(q + " ORDER BY 1, 2"))

    def port_holders(self, proto: str) -> list[tuple[int, str, bool, float | None]]:
        """(host_port, name, running, stopped_at) for `proto`."""
        return [
            (hp, n, state == "running", stopped_at)
            for hp, n, state, stopped_at in self.db.execute(
                "SELECT p.host_port, p.name, c.state, c.stopped_at FROM port_leases p "
                "JOIN containers c USING (name) WHERE p.proto=?",
                (proto,),
            )
        ]

    def set_port_lease(self, host_port: int, proto: str, name: str, port: int) -> None:
        """Lease host_port/proto to name (replacing whoever held it)."""
        self.db.execute(
            "INSERT INTO port_leases (host_port, proto, name, port, since) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (host_port, proto) DO UPDATE SET name=excluded.name, port=excluded.port, "
            "since=excluded.since",
            (host_port, proto, name, port, time.time()),
        )

    def drop_port_lease(self, host_port: int, proto: str) -> None:
        self.db.execute("DELETE FROM port_leases WHERE host_port=? AND proto=?", (host_port, proto))

    def move_port_leases(self, old: str, new: str) -> int:
        return self.db.execute("UPDATE port_leases SET name=? WHERE name=?", (new, old)).rowcount

    def leases(self) -> list[dict]:
        rows = self.db.execute(
            """SELECT 'ip', l.ip, NULL, l.name, c.state, c.stopped_at, l.since FROM ip_leases l
               JOIN containers c USING (name)
               UNION ALL
               SELECT 'port', p.host_port, p.proto || ':' || p.port, p.name, c.state, c.stopped_at, p.since
               FROM port_leases p JOIN containers c USING (name)
               ORDER BY 1, 4"""
        )
        return [
            {"kind": k, "lease": str(v), "maps": m, "name": n, "state": s, "stopped_at": st, "since": since}
            for k, v, m, n, s, st, since in rows
        ]
