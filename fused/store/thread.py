"""The store on a thread of its own, awaited from trio.

SQLite waits up to its busy timeout for another process's lock, and an etcd
request up to `[store] timeout`: on tether-fused's trio thread either would
stall the control socket (and whatever else shares the loop) behind one slow
call. Every store call goes through here instead. One thread, because a
sqlite3 connection is used by one thread at a time and commits must keep
their order.

A commit is always waited for to its end: its outcome decides whether the
kernel steps made for it are undone. A read may be given up on (`wait`): it
changes nothing, and what it reads is cached for the next one.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import outcome
import trio

from .base import ChangeSet, Store, StoreSnapshot


class StoreThread:
    def __init__(self, store: Store, name: str = "tether-store") -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    @property
    def where(self) -> str:
        """What a request that waited for the store names ("the store PATH", "etcd at URL")."""
        return getattr(self.store, "where", "the store")

    async def _call(self, fn, *args, abandon: bool = False):
        """fn(*args) on the store's thread; the waiting task is woken from
        there (no thread of trio's in between). `abandon`: a cancel stops the
        wait, and the call's result is dropped."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        abandoned = False

        def deliver(result: outcome.Outcome) -> None:  # on the trio thread
            if not abandoned:
                trio.lowlevel.reschedule(task, result)

        def work() -> None:  # on the store's thread
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:  # nobody waits any more
                pass

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            nonlocal abandoned
            if abandon:
                abandoned = True
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED  # its result comes, and decides; the cancel is raised after

        self._pool.submit(work)
        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def snapshot(self, wait: float = math.inf) -> StoreSnapshot:
        """The store's snapshot; trio.TooSlowError after `wait` seconds (the
        read goes on, and its result is cached by the store for the next)."""
        with trio.move_on_after(wait):
            return await self._call(self.store.snapshot, abandon=True)
        raise trio.TooSlowError

    async def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        return await self._call(self.store.commit, change, revision)

    def close(self) -> None:
        """Wait for what is queued, then stop the thread (before the store is closed)."""
        self._pool.shutdown(wait=True)
