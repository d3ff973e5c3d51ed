"""What a running container sees of its served files (fused.container_files),
without root: the mountinfo parser, the classification of what reads returned
(examples and a property), the bounded reader (a FIFO stands for a FUSE server
that hangs) and the whole check over a directory that looks like /proc."""
from __future__ import annotations

import errno
import os
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fused import container_files as cf
from fused.container_files import DEAD, GONE, NOT_TETHERS, OK, STALE, UNCHECKED, Container, Mount, Read

FS = "/run/tether/fs"
WEB = Container("web", "4f1c0de", 4242)
HOSTS = b"127.0.0.1\tlocalhost\n10.213.0.2\tweb\n"
RESOLV = b"nameserver 10.213.0.1\n"


def mountinfo(name: str = "web", device: str = "0:52", fstype: str = "fuse.tether", source: str = "tether",
              resolv: bool = True) -> str:
    """A runc container's mountinfo with tether's three mounts."""
    lines = [
        "600 590 8:1 /var/lib/rootfs / ro,relatime - ext4 /dev/sda1 rw",
        "601 600 0:5 / /proc rw - proc proc rw",
        f"602 600 {device} /{name}/hosts /etc/hosts ro,nosuid,nodev - {fstype} {source} rw,user_id=0",
        f"603 600 {device} /{name} /etc/tether ro,nosuid,nodev - {fstype} {source} rw,user_id=0",
    ]
    if resolv:
        lines.append(f"604 600 {device} /{name}/resolv.conf /etc/resolv.conf ro - {fstype} {source} rw,user_id=0")
    return "\n".join(lines) + "\n"


def good_reads() -> dict[str, Read]:
    return {"/etc/hosts": Read(HOSTS), "/etc/tether/hosts": Read(HOSTS), "/etc/resolv.conf": Read(RESOLV)}


SERVED = {"hosts": Read(HOSTS), "resolv.conf": Read(RESOLV)}
ENOTCONN = Read(errno=errno.ENOTCONN, why=os.strerror(errno.ENOTCONN))


# --- mountinfo -----------------------------------------------------------------
def test_mounts_of_takes_the_top_mount_and_unescapes():
    info = mountinfo() + (
        "605 600 0:60 / /etc/hosts rw - tmpfs tmpfs rw\n"  # mounted over tether's: the top one counts
        "606 600 0:61 / /my\\040dir rw - tmpfs none rw\n"
        "not a mountinfo line\n"
    )
    m = cf.mounts_of(info)
    assert m["/etc/hosts"] == Mount("/etc/hosts", "0:60", "/", "tmpfs", "tmpfs")
    assert not m["/etc/hosts"].tethers
    assert m["/etc/tether"] == Mount("/etc/tether", "0:52", "/web", "fuse.tether", "tether") and m["/etc/tether"].tethers
    assert "/my dir" in m
    assert [s.mount for s in cf.ours(m)] == ["/etc/tether", "/etc/resolv.conf"]


def test_an_older_release_mount_counts_as_tethers():
    assert Mount("/etc/hosts", "0:9", "/web/hosts", "fuse", "tether").tethers  # a plain fuse type, tether's source
    assert not Mount("/etc/hosts", "0:9", "/", "fuse.lxcfs", "lxcfs").tethers


# --- classify ------------------------------------------------------------------
def classify(info: str = mountinfo(), seen=None, served=None, fs_device: str | None = "0:52"):
    return cf.classify(WEB, cf.mounts_of(info), good_reads() if seen is None else seen,
                       SERVED if served is None else served, FS, fs_device)


def test_files_that_read_what_tether_serves_are_ok():
    f = classify()
    assert f.state == OK and f.detail == "/etc/hosts, /etc/tether/hosts, /etc/resolv.conf read what tether serves"
    assert not f.fix


def test_dead_files_of_an_older_connection_say_restart_the_container():
    """The upgrade from a release without the separate file server: the host
    has a new mount (0:77), the container still the dead one (0:52)."""
    f = classify(seen={**good_reads(), "/etc/hosts": ENOTCONN}, fs_device="0:77")
    assert f.state == DEAD and not f.mount_dead
    assert f.detail == ("/etc/hosts: Transport endpoint is not connected: its files come from an older FUSE "
                        f"connection (0:52; the mount at {FS} is 0:77) that nothing serves any more")
    assert f.fix.startswith("restart the container: `runc kill 4f1c0de KILL; runc delete 4f1c0de`, then run it again")
    assert "`podman restart 4f1c0de`" in f.fix


def test_dead_files_on_tethers_own_mount_say_the_mount_comes_first():
    f = classify(seen={**good_reads(), "/etc/tether/hosts": Read(errno=errno.EIO, why="Input/output error")})
    assert f.state == DEAD and f.mount_dead
    assert f.detail == "/etc/tether/hosts: Input/output error: its files come from tether's mount (0:52)"
    assert f.fix.startswith(f"the mount at {FS} fails as well: restart tether-fused")
    assert "runc kill 4f1c0de KILL" in f.fix


def test_nothing_mounted_on_the_host_is_said():
    f = classify(seen={**good_reads(), "/etc/hosts": ENOTCONN}, fs_device=None)
    assert f.state == DEAD and f"nothing of tether's is mounted at {FS}" in f.detail


def test_a_read_that_hangs_is_dead():
    f = classify(seen={**good_reads(), "/etc/hosts": Read(timed_out=True)})
    assert f.state == DEAD and f.detail.startswith(f"/etc/hosts: no answer within {cf.READ_TIMEOUT:g} s")


def test_other_bytes_than_tether_serves_are_stale():
    f = classify(seen={**good_reads(), "/etc/resolv.conf": Read(b"nameserver 8.8.8.8\n")})
    assert f.state == STALE
    assert f.detail == "/etc/resolv.conf is not what tether serves for web (19 bytes read, 22 served)"
    assert "runc kill 4f1c0de KILL" in f.fix


def test_another_names_files_are_stale():
    f = classify(info=mountinfo(name="db"))
    assert f.state == STALE and f.detail == "/etc/hosts is db/hosts of tether's mount, not web's"


def test_an_etc_hosts_that_is_not_tethers_is_its_own_finding():
    f = classify(info="601 600 0:5 / /proc rw - proc proc rw\n", seen={})
    assert f.state == NOT_TETHERS and f.detail == "/etc/hosts is the image's own file, not tether's"
    assert "tether oci patch" in f.fix and "tether oci hooks-dir" in f.fix
    podman = mountinfo().replace("/web/hosts /etc/hosts ro,nosuid,nodev - fuse.tether tether",
                                 "/containers/x/userdata/hosts /etc/hosts rw - ext4 /dev/sda1")
    f = classify(info=podman, seen={})
    assert f.state == NOT_TETHERS
    assert f.detail == ("/etc/hosts is a ext4 mount (/dev/sda1 /containers/x/userdata/hosts), not tether's "
                        "(/etc/tether, /etc/resolv.conf are tether's)")


def test_without_tethers_own_copy_reads_are_not_compared():
    f = classify(served={})
    assert f.state == OK and "not compared" in f.detail
    f = classify(served={"hosts": Read(errno=errno.ENOTCONN, why="x"), "resolv.conf": Read(RESOLV)})
    assert f.state == OK and f.detail == "/etc/resolv.conf read what tether serves"


OUTCOMES = {"same": None, "other": Read(b"old\n"), "enotconn": ENOTCONN, "timeout": Read(timed_out=True)}


@given(st.fixed_dictionaries({p: st.sampled_from(sorted(OUTCOMES)) for p in good_reads()}), st.booleans(), st.booleans())
def test_classification_is_dead_before_stale_before_ok(outcomes, resolv, same_device):
    """Any read that failed makes the files dead, else any that differs makes
    them stale; only reads that all returned tether's bytes are ok."""
    seen = {p: OUTCOMES[o] or good_reads()[p] for p, o in outcomes.items()}
    if not resolv:
        seen.pop("/etc/resolv.conf")
        outcomes = {p: o for p, o in outcomes.items() if p != "/etc/resolv.conf"}
    f = classify(info=mountinfo(resolv=resolv), seen=seen, fs_device="0:52" if same_device else "0:99")
    if any(o in ("enotconn", "timeout") for o in outcomes.values()):
        assert f.state == DEAD and f.mount_dead == same_device
    elif "other" in outcomes.values():
        assert f.state == STALE
    else:
        assert f.state == OK
    assert f.state == OK or "4f1c0de" in f.fix


# --- the reader ----------------------------------------------------------------
@pytest.fixture
def reader():
    r = cf.Reader()
    yield r
    r.close()


def test_the_reader_reads_inside_a_root_and_reports_errors(tmp_path, reader):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_bytes(HOSTS)
    found, missing = reader.read(str(root), ["/etc/hosts", "/etc/missing"], 5)
    assert found == Read(HOSTS)
    assert not missing.ok and missing.errno == errno.ENOENT and missing.why == "No such file or directory"


def test_a_symlink_in_the_root_cannot_lead_outside_it(tmp_path, reader):
    """A container's root is someone else's: an absolute symlink there resolves
    inside it (openat2 RESOLVE_IN_ROOT), never in the host's root."""
    outside = tmp_path / "host-secret"
    outside.write_text("host's\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").symlink_to(outside)
    (root / "etc" / "up").symlink_to("../../../../../../../" + str(outside))
    for r in reader.read(str(root), ["/etc/hosts", "/etc/up"], 5):
        assert not r.ok and r.errno == errno.ENOENT, r
    assert open(root / "etc" / "hosts").read() == "host's\n"  # what a plain open would have read


def test_a_read_that_hangs_is_cut_off_and_the_next_read_works(tmp_path, reader):
    os.mkfifo(tmp_path / "hangs")  # an open with no writer blocks, as a read of a hung FUSE server does
    (tmp_path / "fine").write_bytes(b"x")
    t0 = time.monotonic()
    (r,) = reader.read(str(tmp_path), ["/hangs"], 0.3)
    assert time.monotonic() - t0 < 2
    assert r.timed_out and not r.ok and r.why == "no answer within 0.3 s"
    assert reader.read(str(tmp_path), ["/fine"], 5) == [Read(b"x")]


# --- the whole check over a fake /proc -------------------------------------------
def fake_proc(tmp_path, containers: dict[int, str], fs_device: str = "0:52") -> str:
    """A directory shaped like /proc: self (the host) and each pid's mountinfo,
    mount namespace and root."""
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "mnt").symlink_to("mnt:[4026531841]")
    (proc / "self" / "mountinfo").write_text(f"90 22 {fs_device} / {tmp_path}/fs ro - fuse.tether tether rw\n")
    for pid, info in containers.items():
        (proc / str(pid) / "ns").mkdir(parents=True)
        (proc / str(pid) / "ns" / "mnt").symlink_to(f"mnt:[{4026532000 + pid}]")
        (proc / str(pid) / "mountinfo").write_text(info)
        etc = proc / str(pid) / "root" / "etc"
        (etc / "tether").mkdir(parents=True)
        for path in ("hosts", "tether/hosts", "resolv.conf"):
            (etc / path).write_bytes(RESOLV if path == "resolv.conf" else HOSTS)
    return str(proc)


def served_files(tmp_path, *names: str) -> None:
    for name in names:
        (tmp_path / "fs" / name).mkdir(parents=True)
        (tmp_path / "fs" / name / "hosts").write_bytes(HOSTS)
        (tmp_path / "fs" / name / "resolv.conf").write_bytes(RESOLV)


def test_check_reads_each_container_inside_its_root(tmp_path):
    proc = fake_proc(tmp_path, {11: mountinfo(), 12: mountinfo(name="db")})
    served_files(tmp_path, "web", "db")
    db = Container("db", "d8", 12)
    out = cf.check(tmp_path / "fs", [Container("web", "w1", 11), db], proc=proc)
    assert [(f.name, f.state) for f in out] == [("web", OK), ("db", OK)]
    # db's resolv.conf changed under it, and stays so: stale after the retries
    (tmp_path / "proc" / "12" / "root" / "etc" / "resolv.conf").write_bytes(b"nameserver 9.9.9.9\n")
    assert cf.check(tmp_path / "fs", [db], proc=proc)[0].state == STALE


def test_check_asks_the_daemon_when_the_host_copy_cannot_be_read(tmp_path):
    proc = fake_proc(tmp_path, {11: mountinfo()})
    asked = []

    def daemon(name):
        asked.append(name)
        return {"hosts": HOSTS, "resolv.conf": b"nameserver 1.1.1.1\n", "ports": b""}

    out = cf.check(tmp_path / "fs", [Container("web", "w1", 11)], daemon, proc=proc)  # no fs/web: not served here
    assert asked and set(asked) == {"web"}
    assert out[0].state == STALE and out[0].detail.startswith("/etc/resolv.conf is not what tether serves")


def test_check_gives_a_hung_connection_one_read_and_keeps_its_budget(tmp_path):
    """Three containers on one connection that hangs: the first read is cut off
    at the timeout, the others are not read at all (dead too), and a check
    out of its budget says so instead of waiting."""
    proc = fake_proc(tmp_path, {11: mountinfo(), 12: mountinfo(name="db"), 13: mountinfo(name="x", device="0:60")})
    served_files(tmp_path, "web", "db", "x")
    for pid in (11, 12):
        hosts = tmp_path / "proc" / str(pid) / "root" / "etc" / "hosts"
        hosts.unlink()
        os.mkfifo(hosts)
    cs = [Container("web", "w1", 11), Container("db", "d8", 12), Container("x", "x1", 13)]
    t0 = time.monotonic()
    out = cf.check(tmp_path / "fs", cs, read_timeout=0.3, proc=proc)
    took = time.monotonic() - t0
    assert [f.state for f in out] == [DEAD, DEAD, OK], out
    assert out[0].detail.startswith("/etc/hosts: no answer within 0.3 s") and out[0].mount_dead
    assert out[1].detail.startswith("/etc/hosts: not read: its connection did not answer an earlier read")
    assert took < 2, took
    t0 = time.monotonic()
    out = cf.check(tmp_path / "fs", cs, read_timeout=0.3, budget=0.2, proc=proc)
    assert time.monotonic() - t0 < 1.5
    assert [f.state for f in out] == [DEAD, UNCHECKED, UNCHECKED]
    assert out[2].detail == "not checked: the check ran out of its 0.2 s"


def test_a_process_that_is_gone_or_is_the_hosts_is_no_finding_to_act_on(tmp_path):
    proc = fake_proc(tmp_path, {11: mountinfo()})
    os.unlink(tmp_path / "proc" / "11" / "ns" / "mnt")
    (tmp_path / "proc" / "11" / "ns" / "mnt").symlink_to("mnt:[4026531841]")  # the host's namespace: a reused pid
    out = cf.check(tmp_path / "fs", [Container("web", "w1", 11), Container("db", "d8", 99)], proc=proc)
    assert [f.state for f in out] == [GONE, GONE]
    assert "host's mount namespace" in out[0].detail and out[1].detail == "its process 99 is gone"
