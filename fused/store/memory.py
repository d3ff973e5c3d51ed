"""The in-memory twin of the SQLite store, for unit tests: the same Store
protocol (base.py), the same conflict rule, nothing on disk."""
from __future__ import annotations

from .base import ChangeSet, Conflict, StoreSnapshot, apply


class MemoryStore:
    def __init__(self, snap: StoreSnapshot | None = None) -> None:
        self._snap = snap or StoreSnapshot()
        self.commits = 0

    def snapshot(self) -> StoreSnapshot:
        return self._snap

    def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        if revision != self._snap.revision:
            raise Conflict(f"the store is at revision {self._snap.revision}, not {revision}: plan again")
        self._snap = apply(self._snap, change)
        self.commits += 1
        return self._snap

    def close(self) -> None:
        pass
