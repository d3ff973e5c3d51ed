"""The etcd store against a real, throwaway etcd (in a namespace of the
test's own): the Store contract that SQLite and the in-memory twin pass
(tests/unit/test_store_sqlite.py, run here again), then what only etcd has:
compare-and-swap between two hosts, host liveness on a lease, the watch,
and an unreachable etcd."""
from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

from cluster import etcd_reachable_from_here  # noqa: E402
from fused.errors import StoreError  # noqa: E402
from fused.model import IpLease  # noqa: E402
from fused.store.base import Conflict, Draft  # noqa: E402
from fused.store.etcd import EtcdStore  # noqa: E402
from harness import wait_for  # noqa: E402
from test_store_sqlite import (  # noqa: E402,F401 - the contract, collected again with this module's `store`
    add,
    link,
    running,
    test_a_commit_planned_on_an_older_revision_is_a_conflict_and_writes_nothing,
    test_a_move_writes_its_groups_and_not_its_links,
    test_addresses_and_facades_swap_in_one_change_set_in_any_order,
    test_an_address_changes_hands_in_one_change_set,
    test_an_empty_store_is_an_empty_snapshot,
    test_commit_returns_and_keeps_the_snapshot_after_it,
    test_deleting_a_container_takes_its_leases_and_links_with_it,
    test_every_record_kind_round_trips_and_deletes,
    test_find_running_by_id,
    test_the_draft_refuses_two_names_on_one_address,
)


@pytest.fixture(scope="module")
def etcd():
    net, e, endpoint = etcd_reachable_from_here()
    try:
        yield e
    finally:
        net.close()


def open_store(etcd, prefix: str | None = None, host: str = "h1", **kw) -> EtcdStore:
    return EtcdStore([etcd.endpoint], prefix or "/t%06x" % random.randrange(1 << 24), host, "10.0.0.1", **kw)


@pytest.fixture
def store(etcd):
    s = open_store(etcd)
    yield s
    s.close()


def test_two_hosts_never_take_the_same_address(etcd):
    """Both plan on the same snapshot: the second commit is a Conflict, and
    planned again on a fresh snapshot it sees the first one's lease."""
    prefix = "/t%06x" % random.randrange(1 << 24)
    a, b = open_store(etcd, prefix, "h1"), open_store(etcd, prefix, "h2")
    try:
        add(a, "x")
        add(a, "y")
        da, db = Draft(a.snapshot()), Draft(b.snapshot())
        da.put_ip_lease(IpLease("10.0.0.9", "x", "m", 1.0))
        db.put_ip_lease(IpLease("10.0.0.9", "y", "m", 1.0))
        a.commit(da.change, da.snap.revision)
        with pytest.raises(Conflict):
            b.commit(db.change, db.snap.revision)
        db = Draft(b.snapshot())
        with pytest.raises(StoreError, match="leased to 'x'"):
            db.put_ip_lease(IpLease("10.0.0.9", "y", "m", 1.0))
    finally:
        a.close()
        b.close()


def test_a_commit_on_another_host_is_seen_through_the_watch(etcd):
    prefix = "/t%06x" % random.randrange(1 << 24)
    seen = threading.Event()
    a, b = open_store(etcd, prefix, "h1"), open_store(etcd, prefix, "h2", on_change=seen.set)
    try:
        assert b.snapshot().containers == {}
        time.sleep(0.3)  # the watch is up
        seen.clear()
        t0 = time.monotonic()
        add(a, "web", ip="10.0.0.5")
        assert seen.wait(5), "no watch event"
        took = time.monotonic() - t0
        assert b.snapshot().ip_leases["web"].ip == "10.0.0.5"
        print(f"watch event after {took * 1000:.1f} ms")
    finally:
        a.close()
        b.close()


def test_a_hosts_liveness_is_a_lease(etcd):
    """A host whose keepalives stop (its daemon died, or was stopped: a
    restart within the TTL takes the record over) leaves when its lease
    expires."""
    prefix = "/t%06x" % random.randrange(1 << 24)
    a = open_store(etcd, prefix, "h1", ttl=2)
    b = open_store(etcd, prefix, "h2", ttl=2)
    try:
        assert set(a.snapshot() and a.live_hosts()) == {"h1", "h2"}
        b._stop.set()  # as if its process died: no keepalive, no revoke
        wait_for(lambda: "h2" not in (a.snapshot() and a.live_hosts()), 8, what="h2's lease to expire")
        assert a.live_hosts()["h1"]["underlay"] == "10.0.0.1"
    finally:
        a.close()


def test_a_host_name_a_live_host_has_is_refused_but_a_restart_takes_it_over(etcd):
    prefix = "/t%06x" % random.randrange(1 << 24)
    a = open_store(etcd, prefix, "h1")
    try:
        with pytest.raises(StoreError, match="host name 'h1' is taken .* by a live host at 10.0.0.1"):
            EtcdStore([etcd.endpoint], prefix, "h1", "10.0.0.2")
        again = EtcdStore([etcd.endpoint], prefix, "h1", "10.0.0.1")  # the same host, restarted
        again.close()
    finally:
        a._stop.set()


def test_a_watch_from_a_compacted_revision_reads_everything_again(etcd):
    """etcd back after a long time, its history compacted: the watch cannot
    go on from its last revision, so the next snapshot is a full read."""
    from harness import sh

    prefix = "/t%06x" % random.randrange(1 << 24)
    seen = threading.Event()
    a = open_store(etcd, prefix, "h1")
    b = open_store(etcd, prefix, "h2", on_change=seen.set)
    try:
        b.snapshot()
        old = b._read_rev
        for n in ("x", "y", "z"):
            add(a, n)
        head = a._read_rev
        sh("ip", "netns", "exec", etcd.ns, "etcdctl", "--endpoints", etcd.endpoint, "compact", str(head))
        seen.clear()
        b._dirty = False
        assert b._stream(b._watch_clients[0], old) is None  # compacted: nothing to go on from
        assert seen.is_set() and set(b.snapshot().containers) == {"x", "y", "z"}
    finally:
        a.close()
        b.close()


def test_a_commit_whose_answer_is_lost_is_looked_up_before_it_is_called_failed(etcd, store):
    """The transaction reached etcd but its answer did not come back: the
    commit looks for its own mark, finds it, and counts as done (its kernel
    steps must not be undone); one that never landed still fails."""
    from fused.store.etcd import EtcdUnreachable

    add(store, "x")
    real = store._post

    def answer_lost(path, body, clients=None):
        out = real(path, body, clients)
        if path == "/kv/txn":
            raise EtcdUnreachable("the answer was lost")
        return out

    def never_sent(path, body, clients=None):
        if path == "/kv/txn":
            raise EtcdUnreachable("etcd is unreachable")
        return real(path, body, clients)

    d = Draft(store.snapshot())
    d.update("x", note="landed")
    store._post = answer_lost
    try:
        snap = store.commit(d.change, d.snap.revision)
    finally:
        store._post = real
    assert snap.containers["x"].note == "landed"
    d = Draft(store.snapshot())
    d.update("x", note="lost")
    store._post = never_sent
    try:
        with pytest.raises(StoreError, match="unreachable"):
            store.commit(d.change, d.snap.revision)
    finally:
        store._post = real
    assert store.snapshot().containers["x"].note == "landed"


def test_unreachable_etcd_is_one_line_naming_the_endpoint():
    with pytest.raises(StoreError) as ei:
        EtcdStore(["http://127.0.0.1:9"], "/t", "h1", timeout=0.5)
    msg = str(ei.value)
    assert "\n" not in msg and "http://127.0.0.1:9" in msg and "[store] endpoints" in msg


def test_a_store_of_another_prefix_sees_nothing(etcd, store):
    add(store, "web")
    other = open_store(etcd)
    try:
        assert other.snapshot().containers == {}
    finally:
        other.close()
