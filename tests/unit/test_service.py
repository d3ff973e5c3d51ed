"""fused.service on the in-memory store, with a kernel that records what it is
asked (no root): the straight path snapshot -> plan -> kernel -> commit ->
publish, its undo on failure, and its warnings after a commit."""
from __future__ import annotations

import json

import pytest
import trio

from fused import service as service_mod
from fused.config import Config
from fused.errors import ServiceError
from fused.net.firewall.base import RuleSet
from fused.net.wiring import Worker
from fused.store.memory import MemoryStore

DEAD: set[int] = set()


class FakeWiring:
    def __init__(self) -> None:
        self.veths: set[str] = set()
        self.cuts: list[list[str]] = []
        self.cut_fails = False
        self.missing_conntrack = False

    def wire(self, ep):
        self.veths.add(ep.veth)

    def unwire(self, veth):
        self.veths.discard(veth)

    def veth_exists(self, veth):
        return veth in self.veths

    def bridge_ports(self):
        return sorted(self.veths)

    def cut_problem(self):
        return "conntrack(8) is not installed: install it" if self.missing_conntrack else None

    def unwire_all(self, veths):
        for v in veths:
            self.unwire(v)

    def answer_veth(self, ip):
        return "tt@" + ip

    def hand_over(self, ip, mac, giver_pid, taker_pid, home, giver_own=False):
        self.handed = getattr(self, "handed", []) + [(ip, giver_pid, taker_pid, home)]
        return "recorded"

    def cut(self, filters):
        if self.cut_fails:
            raise OSError("conntrack: operation failed")
        self.cuts += filters
        return len(filters)


class FakeFirewall:
    def __init__(self) -> None:
        self.rules: RuleSet | None = None
        self.fail = False

    def setup(self):
        pass

    def apply(self, rules):
        if self.fail:
            self.fail = False  # the restore after the failure goes through
            raise RuntimeError("iptables: commit refused")
        self.rules = rules
        return 1


BUNDLE = {"dir": "/nonexistent"}


@pytest.fixture
def build(monkeypatch, tmp_path):
    """Service(store, firewall, publish, files): a Service on these parts
    (defaults: the memory store, a recording firewall, a list of publishes)."""
    DEAD.clear()
    (tmp_path / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}}))
    BUNDLE["dir"] = str(tmp_path)
    monkeypatch.setattr(service_mod, "netns_inode", lambda pid: None if pid in DEAD else 4026530000 + pid)
    monkeypatch.setattr(service_mod, "_host_netns", lambda: 1)
    monkeypatch.setattr(service_mod.host_ports, "in_use", lambda port, proto: False)
    cfg = Config(network={"subnet": "10.9.0.0/29", "facade_subnet": "10.10.0.0/24", "port_range": "40000-40009"})
    made = []

    def make(store=None, firewall=None, publish=None, files=None):
        published = []
        s = service_mod.Service(cfg, store or MemoryStore(), FakeWiring(), firewall or FakeFirewall(),
                                Worker("test-kernel"), publish=publish or published.append, files=files)
        s.published = published
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
        s.worker.shutdown()


@pytest.fixture
def svc(build):
    return build()


def state(name: str, pid: int, **ann) -> dict:
    annotations = {"io.tether.name": name, **{f"io.tether.{k}": v for k, v in ann.items()}}
    return {"state_json": json.dumps({"id": name, "pid": pid, "bundle": BUNDLE["dir"], "annotations": annotations}),
            "ppid": 0}


def call(s, op: str, args: dict):
    return trio.run(s.dispatch, op, args)


def hosts(s, name: str) -> str:
    return s.published[-1].files[name].hosts.decode()


def test_register_commits_wires_and_publishes(svc):
    r = call(svc, "register", state("db", 101, expose="5432", publish="5432"))
    pid, root, *binds = r["mounts"].split("\0")  # config.json mounts none of the files: the hook will
    assert (pid, root) == ("101", f"{BUNDLE['dir']}/rootfs")
    assert binds[1::2] == ["/etc/hosts", "/etc/tether", "/etc/resolv.conf"]
    assert r["state"] == "running" and r["ip"] == "10.9.0.2"
    assert r["published"] == ["0.0.0.0:40000->5432/tcp"]
    assert len(svc.wiring.veths) == 1
    forwards = [rule for (table, chain), rules in svc.firewall.rules.chains.items() for rule in rules
                if chain == "OUTPUT"]
    assert [rule.to for rule in forwards] == ["10.9.0.2:5432"]
    assert hosts(svc, "db").endswith("10.9.0.2\tdb\n")
    again = call(svc, "register", state("db", 101, expose="5432", publish="5432"))  # the same start twice
    assert again["ip"] == r["ip"] and svc.store.commits == 1


def test_a_refused_firewall_leaves_nothing_behind(svc):
    svc.firewall.fail = True
    with pytest.raises(RuntimeError, match="commit refused"):
        call(svc, "register", state("db", 101))
    assert svc.store.snapshot().containers == {} and svc.wiring.veths == set()
    assert svc.firewall.rules is not None  # put back in line with the store


def test_a_failed_cut_after_the_commit_is_a_warning(svc):
    call(svc, "register", state("db", 101, expose="5432"))
    call(svc, "register", state("db2", 102, expose="5432"))
    call(svc, "register", state("web", 103, links="db:database"))
    svc.wiring.cut_fails = True
    r = call(svc, "move", {"old": "db", "new": "db2"})
    assert r["links"] == 1 and r["warnings"] == [
        "the old connections were not cut (conntrack: operation failed): they end when they time out"]
    snap = svc.store.snapshot()
    assert snap.groups[snap.links[("web", "database")].group] == "db2"  # committed
    assert hosts(svc, "web").endswith("\tdatabase db2\n")


def test_no_conntrack_refuses_a_retarget_before_the_commit(svc):
    call(svc, "register", state("db", 101, expose="5432"))
    call(svc, "register", state("db2", 102, expose="5432"))
    call(svc, "register", state("web", 103, links="db:database"))
    svc.wiring.missing_conntrack = True
    before = svc.store.snapshot()
    with pytest.raises(ServiceError, match="conntrack"):
        call(svc, "link_retarget", {"consumer": "web", "alias": "database", "target": "db2"})
    assert svc.store.snapshot() is before


def test_abort_undoes_an_eviction_exactly(svc):
    for i in range(5):  # /29: five addresses
        call(svc, "register", state(f"c{i}", 200 + i))
    for i in range(5):
        DEAD.add(200 + i)
        call(svc, "poststop", state(f"c{i}", 200 + i))
    before = svc.store.snapshot()
    r = call(svc, "register", state("new", 300))
    assert r["ip"] == before.ip_leases["c0"].ip  # c0 stopped first: evicted
    assert svc.store.snapshot().containers["c0"].note.startswith("evicted")
    assert call(svc, "abort", state("new", 300))["done"] == "undone"
    after = svc.store.snapshot()
    assert (after.containers, after.ip_leases, after.port_leases, after.links) == (
        before.containers, before.ip_leases, before.port_leases, before.links)
    assert svc.wiring.veths == set()


def test_a_dead_holder_does_not_block_the_pool_and_is_stopped(svc):
    for i in range(5):
        call(svc, "register", state(f"c{i}", 200 + i))
    with pytest.raises(ServiceError, match="address pool exhausted"):
        call(svc, "register", state("extra", 300))
    DEAD.update({200, 201})  # killed, their runtime state deleted: no poststop
    r = call(svc, "register", state("extra", 300))
    assert r["ip"] in ("10.9.0.2", "10.9.0.3")
    assert {n for n, c in svc.store.snapshot().containers.items() if not c.running} == {"c0", "c1"}
    DEAD.add(202)
    assert trio.run(svc.stop_dead) == ["c2"]
    assert trio.run(svc.stop_dead) == []


def test_a_poststop_for_a_live_container_is_ignored(svc):
    call(svc, "register", state("db", 101))
    r = call(svc, "poststop", state("db", 101))
    assert r == {"known": True, "name": "db", "ignored": "its process is alive"}
    assert svc.store.snapshot().containers["db"].running and len(svc.wiring.veths) == 1
    DEAD.add(101)
    assert call(svc, "poststop", state("db", 101)) == {"known": True, "name": "db"}
    assert not svc.store.snapshot().containers["db"].running


def test_rm_frees_the_leases(svc):
    call(svc, "register", state("db", 101, publish="5432"))
    DEAD.add(101)
    call(svc, "poststop", state("db", 101))
    assert call(svc, "rm", {"name": "db"}) == {"name": "db", "freed": ["10.9.0.2"]}
    snap = svc.store.snapshot()
    assert snap.containers == {} and snap.ip_leases == {} and snap.port_leases == {}


def test_a_port_no_longer_published_is_freed_at_the_next_start_but_a_moved_one_stays(svc):
    call(svc, "register", state("db", 101, expose="5432,80", publish="5432,8080:80"))
    call(svc, "register", state("db2", 102, expose="5432,80"))
    call(svc, "move", {"old": "db", "new": "db2"})  # db2 now answers db's host ports
    for pid, name in ((101, "db"), (102, "db2")):
        DEAD.add(pid)
        call(svc, "poststop", state(name, pid))
    r = call(svc, "register", state("db", 111, expose="5432,80", publish="5432"))  # 8080:80 dropped
    assert r["published"] == ["0.0.0.0:40001->5432/tcp"]  # its 40000 went to db2 with the move
    r2 = call(svc, "register", state("db2", 112, expose="5432,80"))
    assert r2["published"] == ["0.0.0.0:8080->80/tcp", "0.0.0.0:40000->5432/tcp"]  # moved in: kept
    DEAD.add(111)
    call(svc, "poststop", state("db", 111))
    r3 = call(svc, "register", state("db", 121, expose="5432", publish=""))
    assert r3["published"] == [] and 40001 not in {hp for hp, _ in svc.store.snapshot().port_leases}


# --- incremental publishing: always what a full render gives ----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fused import graph, plan, render  # noqa: E402

NAMES = ["a", "b", "c", "d", "e", "f"]
OPS = st.lists(st.one_of(
    st.tuples(st.just("start"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("stop"), st.sampled_from(NAMES)),
    st.tuples(st.just("rm"), st.sampled_from(NAMES)),
    st.tuples(st.just("retarget"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("move"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
def test_incremental_publishing_equals_a_full_render(svc, ops):
    svc._pub = None
    svc.store._snap = type(svc.store._snap)()
    DEAD.clear()
    pids: dict[str, int] = {}
    for i, op in enumerate(ops):
        kind, name = op[0], op[1]
        try:
            if kind == "start":
                pids[name] = 1000 + i
                call(svc, "register", state(name, 1000 + i, expose="5432", links=f"{op[2]}:up"))
            elif kind == "stop" and name in pids:
                DEAD.add(pids[name])
                call(svc, "poststop", state(name, pids[name]))
            elif kind == "rm":
                call(svc, "rm", {"name": name})
            elif kind == "retarget":
                call(svc, "link_retarget", {"consumer": name, "alias": "up", "target": op[2], "allow_dangling": True})
            elif kind == "move":
                call(svc, "move", {"old": name, "new": op[2]})
        except ServiceError:
            pass
        snap = svc.store.snapshot()
        if svc._pub is None:
            continue
        assert svc._pub.snap is snap
        full_topo = plan.topology(snap, svc.cfg.network.strategy)
        assert svc._pub.topo.nodes == full_topo.nodes and svc._pub.topo.edges == full_topo.edges
        assert svc._pub.views == graph.views(full_topo)
        files, _ = render.render_all(full_topo, *svc._render_args())
        assert svc._pub.files == files
        full_dns = render.dns_data(full_topo)
        for part in ("names", "links", "hosts", "ptr"):
            assert getattr(svc._pub.dns, part) == getattr(full_dns, part), part


def test_a_host_port_that_changes_hands_loses_its_old_flows(svc):
    """u1 published udp 40003; stopped, its port goes to u2: a tracked flow
    (a client keeping its source port) must not go on reaching u1."""
    a = call(svc, "register", state("u1", 201, expose="53/udp", publish="40003:53/udp"))
    DEAD.add(201)
    call(svc, "poststop", state("u1", 201))
    call(svc, "register", state("u2", 202, expose="53/udp", publish="40003:53/udp"))
    trio.run(svc.worker.run, lambda: None)  # the cut is queued on the kernel thread after the answer
    assert svc.wiring.cuts == [["-p", "udp", "--orig-port-dst", "40003", "-r", a["ip"]]]
    call(svc, "register", state("u3", 203))  # no port changes hands: nothing cut
    trio.run(svc.worker.run, lambda: None)
    assert len(svc.wiring.cuts) == 1


def test_an_address_given_to_another_or_freed_loses_its_old_flows(svc):
    for i in range(5):  # /29: five addresses
        call(svc, "register", state(f"c{i}", 200 + i))
        DEAD.add(200 + i)
        call(svc, "poststop", state(f"c{i}", 200 + i))
    old = svc.store.snapshot().ip_leases["c0"].ip
    assert call(svc, "register", state("new", 300))["ip"] == old  # c0 evicted
    trio.run(svc.worker.run, lambda: None)
    assert svc.wiring.cuts == [["-r", old]]
    # removed: its address and host port go back to the pools, and their flows go
    call(svc, "register", state("db", 301, publish="5432"))
    ip, port = svc.store.snapshot().ip_leases["db"].ip, next(iter(svc.store.snapshot().port_leases))[0]
    DEAD.add(301)
    call(svc, "poststop", state("db", 301))
    trio.run(svc.worker.run, lambda: None)  # db evicted c1: that cut done
    svc.wiring.cuts.clear()
    call(svc, "rm", {"name": "db"})
    trio.run(svc.worker.run, lambda: None)
    assert svc.wiring.cuts == [["-p", "tcp", "--orig-port-dst", str(port), "-r", ip], ["-r", ip]]



@pytest.fixture
def reassign(svc):
    svc.cfg = svc.cfg.model_copy(update={"network": svc.cfg.network.model_copy(update={"strategy": "reassign"})})
    return svc


def test_a_handing_move_gives_olds_address_to_new_and_an_undo_takes_it_back(reassign):
    s = reassign
    x = call(s, "register", state("db", 101, expose="5432"))["ip"]
    y = call(s, "register", state("db2", 102, expose="5432"))["ip"]
    r = call(s, "move", {"old": "db", "new": "db2"})
    assert r["addresses"] == [{"ip": x, "from": "db", "to": "db2"}]
    assert s.wiring.handed == [(x, 101, 102, None)]
    snap = s.store.snapshot()
    assert snap.containers["db2"].answers == (x,) and snap.ip_leases["db"].ip == x
    # nobody else is given x while db2 answers at it, not even db's next start
    DEAD.add(101)
    call(s, "poststop", state("db", 101))
    z = call(s, "register", state("db", 103, expose="5432"))["ip"]
    assert z not in (x, y) and "answered by db2" in s.store.snapshot().containers["db"].note
    for i in range(2):
        assert call(s, "register", state(f"n{i}", 200 + i))["ip"] not in (x, y, z)
    # db2 -> db: db's own address is z now, so db2's addresses (x too) go to db
    call(s, "move", {"old": "db2", "new": "db"})
    assert s.store.snapshot().containers["db"].answers == (y, x)


def test_an_undo_brings_new_its_own_address_home(reassign):
    s = reassign
    x = call(s, "register", state("db", 101, expose="5432"))["ip"]
    call(s, "register", state("db2", 102, expose="5432"))
    call(s, "move", {"old": "db", "new": "db2"})
    call(s, "move", {"old": "db2", "new": "db"})
    assert s.wiring.handed[-1] == (x, 102, 101, service_mod.veth_name(s.cfg.network.bridge, "db"))
    snap = s.store.snapshot()
    assert snap.containers["db2"].answers == () and snap.containers["db"].answers == ()


def test_a_handing_move_to_a_stopped_container_changes_nothing(reassign):
    s = reassign
    call(s, "register", state("db", 101, expose="5432"))
    call(s, "register", state("db2", 102, expose="5432"))
    DEAD.add(102)
    before = s.store.snapshot()
    with pytest.raises(ServiceError, match="'db2' is not running"):
        call(s, "move", {"old": "db", "new": "db2"})
    assert s.store.snapshot() is before


def test_a_failed_hand_over_refuses_the_move_and_changes_nothing(reassign):
    s = reassign
    call(s, "register", state("db", 101, expose="5432"))
    call(s, "register", state("db2", 102, expose="5432"))

    def refuse(*a, **kw):
        raise OSError("netlink: operation not permitted")

    s.wiring.hand_over = refuse
    before = s.store.snapshot()
    with pytest.raises(ServiceError, match="db2 could not take over .*nothing was moved"):
        call(s, "move", {"old": "db", "new": "db2"})
    assert s.store.snapshot() is before


# --- nothing waits on the trio thread; changes have a deadline; a full store is one line ----------

import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from fused.errors import DeadlineError, StoreFull  # noqa: E402


class HeldStore(MemoryStore):
    """A store whose commits wait while `held` is set (SQLite's busy wait, a slow etcd)."""

    where = "the store /state/tether.db"

    def __init__(self) -> None:
        super().__init__()
        self.held = threading.Event()
        self.waiting = threading.Event()

    def commit(self, change, revision):
        give_up = time.monotonic() + 3  # on the trio thread (the bug this guards against), a hang would be the test's
        while self.held.is_set() and time.monotonic() < give_up:
            self.waiting.set()
            time.sleep(0.005)
        return super().commit(change, revision)


class HeldFiles:
    """FileService's side the service reads (pid, conn), and a publish that
    waits while `held` is set, as for a stopped file server."""

    def __init__(self) -> None:
        self.pid, self.conn, self.problem = 4242, object(), None
        self.held = threading.Event()
        self.waiting = threading.Event()
        self.served = []
        self.drop = False

    def publish(self, snapshot) -> None:
        give_up = time.monotonic() + 3
        while self.held.is_set() and time.monotonic() < give_up:
            self.waiting.set()
            time.sleep(0.005)
        if self.drop:  # FileService's way of saying "not acknowledged": it let go of the file server
            self.conn = None
            return
        self.served.append(snapshot)


async def until(event: threading.Event) -> None:
    while not event.is_set():
        await trio.sleep(0.005)


def three(s) -> None:
    call(s, "register", state("db", 101, expose="5432"))
    call(s, "register", state("db2", 102, expose="5432"))
    call(s, "register", state("web", 103, links="db:database"))


def test_reads_answer_while_a_change_waits_for_the_file_server(build):
    files = HeldFiles()
    s = build(publish=files.publish, files=files)
    three(s)
    files.held.set()
    seen = {}

    async def main():
        async with trio.open_nursery() as n:
            async def retarget():
                seen["retarget"] = await s.dispatch(
                    "link_retarget", {"consumer": "web", "alias": "database", "target": "db2"})
                seen["retarget_done"] = trio.current_time()

            n.start_soon(retarget)
            await until(files.waiting)
            t0 = trio.current_time()
            seen["ps"] = await s.dispatch("ps", {})
            seen["link_ls"] = await s.dispatch("link_ls", {})
            seen["inspect"] = await s.dispatch("inspect", {"name": "web"})
            seen["reads"] = trio.current_time() - t0
            assert "retarget" not in seen  # it waits for its files
            await trio.sleep(0.2)
            assert "retarget" not in seen
            seen["released"] = trio.current_time()
            files.held.clear()

    trio.run(main)
    assert seen["reads"] < 0.2
    assert [r["target"] for r in seen["link_ls"]] == ["db2"]  # committed: the store says so
    assert "warnings" not in seen["retarget"]
    assert seen["retarget_done"] >= seen["released"]
    assert files.served[-1].files["web"].hosts.decode().endswith("\tdatabase db2\n")


def test_publishes_reach_the_file_server_in_commit_order(build):
    files = HeldFiles()
    s = build(publish=files.publish, files=files)
    three(s)
    files.held.set()
    targets = ["db2", "db", "db2", "db"]

    async def main():
        async with trio.open_nursery() as n:
            for i, t in enumerate(targets):
                n.start_soon(s.dispatch, "link_retarget", {"consumer": "web", "alias": "database", "target": t})
                await trio.sleep(0.02)  # each one commits while the first's files wait
            await until(files.waiting)
            files.held.clear()

    before = len(files.served)
    trio.run(main)
    revisions = [snap.mtime_ns for snap in files.served[before:]]
    assert revisions == sorted(revisions) and len(revisions) < len(targets)  # in order; the waiting ones merged
    assert files.served[-1].files["web"].hosts.decode().endswith("\tdatabase db\n")  # the last commit's


def test_files_the_file_server_did_not_take_are_a_warning_on_a_committed_change(build):
    files = HeldFiles()
    s = build(publish=files.publish, files=files)
    three(s)
    files.drop = True
    r = call(s, "link_retarget", {"consumer": "web", "alias": "database", "target": "db2"})
    assert r["target"] == "db2"
    assert r["warnings"] == ["the change is committed, but the file server (pid 4242) did not acknowledge its "
                             "files: it was restarted, and the new one serves them"]


def test_files_not_acknowledged_by_the_answer_are_a_warning(build, monkeypatch):
    monkeypatch.setattr(service_mod, "ANSWER_WITHIN", 0.3)
    files = HeldFiles()
    s = build(publish=files.publish, files=files)
    three(s)
    files.held.set()
    try:
        r = call(s, "link_retarget", {"consumer": "web", "alias": "database", "target": "db2"})
    finally:
        files.held.clear()
    assert r["target"] == "db2" and len(r["warnings"]) == 1
    assert r["warnings"][0].startswith("the change is committed, but the file server (pid 4242) has not "
                                       "acknowledged its files after 0.3 s")


def test_a_change_behind_a_slow_store_is_refused_in_one_line_and_leaves_nothing(build, monkeypatch):
    monkeypatch.setattr(service_mod, "CHANGE_DEADLINE", 0.3)
    store = HeldStore()
    s = build(store=store)
    call(s, "register", state("db", 101, expose="5432"))
    store.held.set()
    seen = {}

    async def main():
        async with trio.open_nursery() as n:
            async def first():
                seen["first"] = await s.dispatch("link_add", {"consumer": "db", "target": "db", "alias": "self"})

            n.start_soon(first)
            await until(store.waiting)
            t0 = trio.current_time()
            seen["ps"] = await s.dispatch("ps", {})  # the store's thread is held: from the last publish
            seen["read"] = trio.current_time() - t0
            with pytest.raises(DeadlineError) as e:
                await s.dispatch("register", state("web", 102))
            seen["refused"] = str(e.value)
            store.held.clear()

    trio.run(main)
    assert seen["read"] < service_mod.READ_WAIT + 0.2 and [c["name"] for c in seen["ps"]] == ["db"]
    assert seen["refused"].startswith("gave up after 0.3 s waiting for an earlier change, which waits "
                                      "for the store /state/tether.db: nothing was changed; try again")
    assert "\n" not in seen["refused"]
    assert set(store.snapshot().containers) == {"db"} and len(s.wiring.veths) == 1  # web: nothing left
    assert seen["first"]["alias"] == "self"  # the slow one went through once the store answered


def test_a_change_that_misses_its_deadline_before_the_commit_undoes_its_kernel_steps(build, monkeypatch):
    monkeypatch.setattr(service_mod, "CHANGE_DEADLINE", 0.2)

    class SlowFirewall(FakeFirewall):
        def apply(self, rules):
            time.sleep(0.3)
            return super().apply(rules)

    fw = SlowFirewall()
    s = build(firewall=fw)
    with pytest.raises(DeadlineError, match=r"^gave up after 0\.\d s waiting for the firewall: nothing was changed"):
        call(s, "register", state("db", 101))
    assert s.store.snapshot().containers == {} and s.wiring.veths == set() and s.store.commits == 0
    assert fw.rules is not None and "10.9.0.2" not in repr(fw.rules)  # put back: the empty store's rules


class FullStore(MemoryStore):
    where = "the store /full/tether.db"
    full = True

    def commit(self, change, revision):
        if self.full:
            raise StoreFull("no space left on tmpfs (/full) for the store /full/tether.db: free space there or "
                            "move state_dir")
        return super().commit(change, revision)


def test_a_full_store_refuses_a_change_in_one_line_and_leaves_nothing(build, caplog):
    store = FullStore()
    store.full = False
    s = build(store=store)
    three(s)
    store.full = True
    before = store.snapshot()
    rules = s.firewall.rules
    caplog.set_level(logging.INFO)
    for op, args in (("register", state("new", 110)),
                     ("link_retarget", {"consumer": "web", "alias": "database", "target": "db2"}),
                     ("link_add", {"consumer": "web", "target": "db2", "alias": "other"})):
        caplog.clear()
        with pytest.raises(StoreFull, match="^no space left on tmpfs"):
            call(s, op, args)
        assert store.snapshot() is before and s.firewall.rules == rules and len(s.wiring.veths) == 3
        lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in lines] == [
            f"{op.replace('_', ' ')} refused: no space left on tmpfs (/full) for the store /full/tether.db: "
            "free space there or move state_dir"]
        assert all(r.exc_info is None for r in caplog.records)  # no traceback
    assert [c["name"] for c in call(s, "ps", {})] == ["db", "db2", "web"]
    store.full = False  # space again: all works
    assert call(s, "link_retarget", {"consumer": "web", "alias": "database", "target": "db2"})["target"] == "db2"


def test_reconcile_on_a_full_store_serves_the_store_as_it_is(build):
    store = FullStore()
    store.full = False
    s = build(store=store)
    three(s)
    store.full = True
    DEAD.add(101)  # db died while the daemon was away: marking it stopped needs space
    s._pub = None  # as at a start
    r = call(s, "reconcile", {})
    assert r["stopped"] == []
    assert store.snapshot().containers["db"].running
    assert s._pub.snap is store.snapshot() and s.published[-1].files["web"].hosts  # served as the store has it
    store.full = False
    assert call(s, "reconcile", {})["stopped"] == ["db"]
