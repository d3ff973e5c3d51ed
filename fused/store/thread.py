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
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import outcome
import trio

from .base import ChangeSet, Store, StoreSnapshot


class StoreThread:
    def __init__(self, store: Store, name: str = "tether-store") -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.busy = 0  # calls queued or running: a reader that would queue behind them need not
        self._count = threading.Lock()

    @property
    def where(self) -> str:
        """What a request that waited for the store names ("the store PATH", "etcd at URL")."""
        return getattr(self.store, "where", "the store")

    @property
    def timeout(self) -> float:
        """The longest one call may take before the store itself gives up."""
        return float(getattr(self.store, "timeout", 0.0))

    def _submit(self, fn, *args) -> Future:
        with self._count:
            self.busy += 1
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: Future) -> None:  # on the store thread
        with self._count:
            self.busy -= 1

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

        self._submit(work)
        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def snapshot(self, wait: float = math.inf) -> StoreSnapshot:
        """The store's snapshot; trio.TooSlowError after `wait` seconds (the
        read goes on, and its result is cached by the store for the next)."""
        with trio.move_on_after(wait):
            return await self._call(self.store.snapshot, abandon=True)
        raise trio.TooSlowError

    async def commit(self, change: ChangeSet, revision: int) -> StoreSnapshot:
        return await self._call(self.store.commit, change, revision)

    async def run(self, fn, *args):
        """Any other call on the store (its thread, its order)."""
        return await self._call(fn, *args)

    def close(self) -> None:
        """Wait for what is queued, then stop the thread (before the store is closed)."""
        self._pool.shutdown(wait=True)
