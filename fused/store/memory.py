"""The in-memory twin of the SQLite store, for unit tests: the same Store
protocol (base.py), the same conflict rule, nothing on disk."""
from __future__ import annotations

from .base import ChangeSet, Conflict, StoreError, StoreSnapshot, apply


def _constraints(snap: StoreSnapshot) -> None:
    """What SQLite's schema enforces, so that both refuse the same change sets."""
    ips = [l.ip for l in snap.ip_leases.values()]
    if len(ips) != len(set(ips)):
        raise StoreError("UNIQUE constraint failed: ip_leases.ip")
    facades = [l.facade for l in snap.links.values() if l.facade]
    if len(facades) != len(set(facades)):
        raise StoreError("UNIQUE constraint failed: links.facade")
    names = snap.containers
    if any(n not in names for n in snap.ip_leases) or any(l.name not in names for l in snap.port_leases.values()) \
            or any(c not in names for c, _ in snap.links) \
            or any(l.group not in snap.groups for l in snap.links.values()):
        raise StoreError("FOREIGN KEY constraint failed")


class MemoryStore:
    def __init__(self, snap: StoreSnapshot | None = None) -> None:
        self._snap = snap or StoreSnapshot()
        self.commits = 0

    def snapshot(self) -> StoreSnapshot:
        return self._snap

    def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        if revision != self._snap.revision:
            raise Conflict(f"the store is at revision {self._snap.revision}, not {revision}: plan again")
        after = apply(self._snap, change)
        _constraints(after)
        self._snap = after
        self.commits += 1
        return self._snap

    def close(self) -> None:
        pass
