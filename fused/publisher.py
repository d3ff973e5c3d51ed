"""Served files handed to the file server on a thread of their own.

Handing a snapshot over waits for the file server's acknowledgement (up to
fs/session.py's ACK_TIMEOUT, after which it restarts the file server, and
the next one serves the newest snapshot before it answers anything). On
tether-fused's trio thread that wait would stall every request behind a
paused or slow file server; here a request waits only for its own files.

One thread, so snapshots reach the file server in commit order. Each
snapshot is the whole state: one still waiting when a newer one comes is
skipped, and whoever waited for it is answered with the newer one's
delivery, which contains its change.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import trio

log = logging.getLogger("tether.publish")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """How a snapshot (and every one before it) reached the file server."""

    seq: int
    acknowledged: bool  # False: not taken; the file server is restarted and serves the newest
    server: int | None  # the file server's pid it was handed to


@dataclasses.dataclass
class _Waiter:
    seq: int
    event: trio.Event
    token: trio.lowlevel.TrioToken
    delivery: Delivery | None = None


class Publisher:
    """`hand_over(snapshot)` runs on the publishing thread and returns the
    Delivery's (acknowledged, server)."""

    def __init__(self, hand_over: Callable[[object], tuple[bool, int | None]], name: str = "tether-publish") -> None:
        self._hand_over = hand_over
        self._name = name
        self._cv = threading.Condition()
        self._seq = 0
        self._next: tuple[int, object] | None = None
        self._waiters: list[_Waiter] = []
        self.delivered = Delivery(0, True, None)
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, snapshot) -> int:
        """Queue `snapshot` (replacing one not yet handed over); its number."""
        with self._cv:
            if self._thread is None:  # made at the first snapshot: a Service that never publishes has none
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._seq += 1
            self._next = (self._seq, snapshot)
            self._cv.notify()
            return self._seq

    async def wait(self, seq: int, timeout: float) -> Delivery | None:
        """The delivery of snapshot `seq` (or a later one); None when it has
        not come within `timeout` seconds."""
        with self._cv:
            if self.delivered.seq >= seq:
                return self.delivered
            w = _Waiter(seq, trio.Event(), trio.lowlevel.current_trio_token())
            self._waiters.append(w)
        with trio.move_on_after(timeout):
            await w.event.wait()
            return w.delivery
        with self._cv:
            if w in self._waiters:
                self._waiters.remove(w)
        return w.delivery

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._next is None and not self._closed:
                    self._cv.wait()
                if self._next is None:
                    return
                seq, snapshot = self._next
                self._next = None
            try:
                acknowledged, server = self._hand_over(snapshot)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad hand-over
                log.exception("handing snapshot %d to the file server failed", seq)
                acknowledged, server = False, None
            with self._cv:
                self.delivered = Delivery(seq, acknowledged, server)
                ready = [w for w in self._waiters if w.seq <= seq]
                self._waiters = [w for w in self._waiters if w.seq > seq]
            for w in ready:
                w.delivery = self.delivered
                try:
                    w.token.run_sync_soon(w.event.set)
                except trio.RunFinishedError:  # its trio run ended meanwhile: nobody to tell
                    pass

    def close(self, timeout: float = 10.0) -> None:
        """Hand over what is queued, then stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
