"""fused/publisher.py: snapshots handed over on a thread of their own, in
order, the waiting ones merged into the newest, each waiter answered."""
from __future__ import annotations

import threading
import time

import trio

from fused.publisher import Publisher


def test_in_order_merged_and_every_waiter_answered():
    handed: list[int] = []
    gate, entered = threading.Event(), threading.Event()

    def hand_over(snap):
        entered.set()
        gate.wait(5)
        handed.append(snap)
        return snap != 3, 77

    p = Publisher(hand_over)
    got = {}

    async def main():
        seqs = [p.submit(1)]
        while not entered.is_set():  # 1 is being handed over (and waits) ...
            await trio.sleep(0.001)
        seqs += [p.submit(2), p.submit(3)]  # ... and 2, not handed over yet, is replaced by 3
        async with trio.open_nursery() as n:
            async def wait(seq):
                got[seq] = await p.wait(seq, 5)

            for seq in seqs:
                n.start_soon(wait, seq)
            await trio.sleep(0.05)
            assert got == {}
            gate.set()
        assert await p.wait(seqs[0], 0) == got[seqs[-1]]  # already delivered: at once, the newest delivery

    trio.run(main)
    p.close()
    assert handed == [1, 3]
    assert (got[1].seq, got[1].acknowledged) == (1, True)
    assert got[2] == got[3] and (got[3].seq, got[3].acknowledged, got[3].server) == (3, False, 77)


def test_a_waiter_gives_up_after_its_timeout_and_the_snapshot_still_goes():
    gate = threading.Event()
    handed = []
    p = Publisher(lambda snap: (gate.wait(5), handed.append(snap), (True, None))[-1])

    async def main():
        seq = p.submit("a")
        t0 = time.monotonic()
        assert await p.wait(seq, 0.1) is None
        assert time.monotonic() - t0 < 1

    trio.run(main)
    gate.set()
    p.close()
    assert handed == ["a"]  # close hands over what was queued


def test_a_hand_over_that_raises_is_not_acknowledged_and_the_thread_goes_on():
    def hand_over(snap):
        if snap == "bad":
            raise OSError("broken pipe")
        return True, 1

    p = Publisher(hand_over)

    async def main():
        bad = await p.wait(p.submit("bad"), 5)
        good = await p.wait(p.submit("good"), 5)
        return bad, good

    bad, good = trio.run(main)
    p.close()
    assert not bad.acknowledged and good.acknowledged
