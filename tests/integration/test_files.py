"""Issue: served files (/etc/hosts, ports, env) from FUSE, live from the link graph."""
from __future__ import annotations

import errno
import os
import subprocess
import threading

import pytest

from harness import Daemon
from fused.protocol import request

SLEEP = ["sleep", "1000000"]
LOCAL = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@pytest.fixture(scope="module")
def linked(rootfs):
    """db (5432, 5433) and db2 (5432) answering with their names; web --link db:database."""
    d = Daemon(rootfs)
    try:
        d.start()
        d.start_container("db", None, "--expose", "5432", "--expose", "5433")
        d.start_container("db2", None, "--expose", "5432")
        d.start_container("web", SLEEP, "--link", "db:database")
        yield d
    finally:
        d.close()


def ip(d, name):
    return d.container(name)["ip"]


def cat(d, cid, path):
    return d.exec(cid, "cat", path).stdout


def retarget(d, consumer, alias, target):
    return request(str(d.sock), "link_retarget", {"consumer": consumer, "alias": alias, "target": target})


def test_web_sees_its_link(linked):
    d = linked
    hosts = cat(d, "web", "/etc/hosts")
    assert hosts == LOCAL + f"{ip(d, 'web')}\tweb\n{ip(d, 'db')}\tdatabase db\n"
    assert cat(d, "web", "/etc/tether/ports") == (
        f"database\ttcp\t5432\t{ip(d, 'db')}\ndatabase\ttcp\t5433\t{ip(d, 'db')}\n"
    )
    assert cat(d, "web", "/etc/tether/env") == "DOCKER_LINK_PORT_DATABASE=5432,5433\n"
    assert cat(d, "web", "/etc/tether/hosts") == hosts
    # the target was known at patch time: the variable is in the process env too
    assert "DOCKER_LINK_PORT_DATABASE=5432,5433" in cat(d, "web", "/proc/1/environ").split("\0")
    assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db"


def test_retarget_while_running(linked):
    d = linked
    pid_before = d.exec("web", "cat", "/proc/1/stat").stdout.split()[0]
    ino_before = d.exec("web", "stat", "-c", "%i", "/etc/hosts").stdout
    try:
        d.cli("link", "retarget", "web", "database", "db2")
        hosts = cat(d, "web", "/etc/hosts")  # busybox cat: sendfile
        assert f"{ip(d, 'db2')}\tdatabase db2\n" in hosts and "db\n" not in hosts.replace("db2", "")
        assert d.exec("web", "nc", "-w", "3", "database", "5432").stdout.strip() == "db2"
        assert cat(d, "web", "/etc/tether/env") == "DOCKER_LINK_PORT_DATABASE=5432\n"
        # the host side, through read() and through sendfile
        path = d.run_dir / "fs" / "web" / "hosts"
        assert path.read_text() == hosts
        fd = os.open(path, os.O_RDONLY)
        try:
            r, w = os.pipe()
            n = os.sendfile(w, fd, 0, 65536)
            assert os.read(r, 65536).decode() == hosts and n == len(hosts)
            os.close(r), os.close(w)
        finally:
            os.close(fd)
        # nothing restarted, nothing rewritten: same process, same inode
        assert d.exec("web", "cat", "/proc/1/stat").stdout.split()[0] == pid_before
        assert d.exec("web", "stat", "-c", "%i", "/etc/hosts").stdout == ino_before
    finally:
        d.cli("link", "retarget", "web", "database", "db")
    assert f"{ip(d, 'db')}\tdatabase db\n" in cat(d, "web", "/etc/hosts")


def test_reads_are_whole_snapshots_during_500_retargets(linked):
    d = linked
    a = LOCAL + f"{ip(d, 'web')}\tweb\n{ip(d, 'db')}\tdatabase db\n"
    b = LOCAL + f"{ip(d, 'web')}\tweb\n{ip(d, 'db2')}\tdatabase db2\n"
    # the loop's shell says its pid first, so that exactly it is stopped at
    # the end: killing every `sh` also hit a child forked for `cat` before
    # its exec, and the loop then printed an empty read. A cat that fails
    # prints FAILED.
    reader = subprocess.Popen(
        ["runc", "--root", str(d.runc_root), "exec", "web", "sh", "-c",
         "echo $$; while [ ! -e /proc/self/nonexistent ]; do cat /etc/hosts || echo FAILED; echo @@; done"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    loop = reader.stdout.readline().decode().strip()
    assert loop.isdigit(), loop
    out = []
    t = threading.Thread(target=lambda: out.append(reader.stdout.read()))
    t.start()
    try:
        for i in range(500):
            retarget(d, "web", "database", "db2" if i % 2 == 0 else "db")
    finally:
        d.runc("exec", "web", "kill", loop, check=False)
        reader.wait(10)
        t.join(10)
    reads = out[0].decode().split("@@\n")[:-1]  # the last: cut short by the kill
    assert len(reads) > 50
    bad = [r for r in reads if r not in (a, b)]
    assert not bad, bad[:3]
    assert a in reads and b in reads  # the reader really overlapped the changes
    assert cat(d, "web", "/etc/hosts") == a  # 500 retargets: ends on db


def test_container_cannot_write_or_escape(linked):
    d = linked
    for path in ("/etc/hosts", "/etc/tether/hosts", "/etc/tether/env", "/etc/tether/new"):
        r = d.exec("web", "sh", "-c", f"echo x > {path}", check=False)
        assert r.returncode != 0 and ("Read-only" in r.stderr or "Permission" in r.stderr), r.stderr
    for cmd in ("touch /etc/tether/x", "mkdir /etc/tether/d", "chmod 777 /etc/tether/hosts", "rm /etc/tether/env"):
        assert d.exec("web", "sh", "-c", cmd, check=False).returncode != 0, cmd
    # '..' from the bind mount is the container's own /etc, not the FUSE root
    listing = d.exec("web", "ls", "/etc/tether/..").stdout.split()
    assert "db" not in listing and "tether" in listing
    assert d.exec("web", "ls", "/etc/tether/../db", check=False).returncode != 0
    # the mount source names a host path that does not exist in the container
    src = [l.split()[0] for l in cat(d, "web", "/proc/self/mounts").splitlines() if " /etc/hosts " in l]
    assert src
    assert d.exec("web", "ls", str(d.run_dir / "fs" / "db"), check=False).returncode != 0
    assert sorted(d.exec("web", "ls", "/etc/tether").stdout.split()) == ["env", "hosts", "ports", "resolv.conf"]


def test_lookup_rules_and_statfs(linked):
    d = linked
    fs = d.run_dir / "fs"
    for bad in ("UPPER", "x" * 64, "with space", "-x", "a.b", "a_b"):
        with pytest.raises(FileNotFoundError):
            os.stat(fs / bad)
    with pytest.raises(FileNotFoundError):
        os.stat(str(fs) + "/../x")
    # any valid name exists before it registers
    assert sorted(os.listdir(fs / "not-yet")) == ["env", "hosts", "ports", "resolv.conf"]
    assert (fs / "not-yet" / "hosts").read_text() == LOCAL
    assert (fs / ("y" * 63) / "env").read_text() == ""
    assert set(os.listdir(fs)) >= {"db", "db2", "web"}
    st = os.statvfs(fs / "web" / "hosts")
    assert st.f_namemax == 63
    for op in (lambda: open(fs / "web" / "hosts", "w"), lambda: os.mkdir(fs / "web" / "x"), lambda: (fs / "web" / "hosts").chmod(0o777)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert os.stat(fs / "web" / "hosts").st_size == len((fs / "web" / "hosts").read_bytes())


def test_stopped_removed_and_returning_target(rootfs):
    with Daemon(rootfs) as d:
        d.start()
        bt = d.start_container("t1", None, "--expose", "80")
        d.start_container("c1", SLEEP, "--link", "t1:svc")
        t_ip = ip(d, "t1")
        line = f"{t_ip}\tsvc t1\n"
        assert line in cat(d, "c1", "/etc/hosts")
        d.kill("t1")
        assert line in cat(d, "c1", "/etc/hosts")  # stopped: sticky address, line stays
        assert [l["state"] for l in d.cli_json("link", "ls")] == ["stopped"]
        d.cli("rm", "t1")
        assert cat(d, "c1", "/etc/hosts") == LOCAL + f"{ip(d, 'c1')}\tc1\n"
        assert cat(d, "c1", "/etc/tether/env") == ""
        assert [l["state"] for l in d.cli_json("link", "ls")] == ["dangling"]
        assert "dangling" in d.cli("link", "ls").stdout
        d.run("t1", bt)
        assert f"{ip(d, 't1')}\tsvc t1\n" in cat(d, "c1", "/etc/hosts")
        assert cat(d, "c1", "/etc/tether/env") == "DOCKER_LINK_PORT_SVC=80\n"


def test_link_cli_errors_change_nothing(linked):
    d = linked
    before = d.cli_json("link", "ls")
    cases = [
        (["link", "add", "web", "db2", "--alias", "database"], "already has a link"),
        (["link", "add", "nobody", "db"], "no container named 'nobody'"),
        (["link", "add", "web", "db", "--alias", "Bad"], "invalid alias"),
        (["link", "rm", "web", "nothing"], "no link with alias 'nothing'"),
        (["link", "retarget", "web", "database", "UP"], "invalid target name"),
        (["link", "retarget", "web", "nothing", "db2"], "no link with alias"),
        # a typo would take web's database line away: refused, like move
        (["link", "retarget", "web", "database", "ghost"], "no container named 'ghost'"),
    ]
    for args, msg in cases:
        r = d.cli(*args, check=False)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert d.cli_json("link", "ls") == before
    # the explicit escape: the line goes until ghost registers
    d.cli("link", "retarget", "web", "database", "ghost", "--allow-dangling")
    assert "database" not in cat(d, "web", "/etc/hosts")
    assert [l["state"] for l in d.cli_json("link", "ls") if l["alias"] == "database"] == ["dangling"]
    d.cli("link", "retarget", "web", "database", "db")
    assert f"{ip(d, 'db')}\tdatabase db\n" in cat(d, "web", "/etc/hosts")
    # add + rm round trip, visible to web at once
    d.cli("link", "add", "web", "db2", "--alias", "cache")
    assert f"{ip(d, 'db2')}\tcache db2\n" in cat(d, "web", "/etc/hosts")
    d.cli("link", "rm", "web", "cache")
    assert "cache" not in cat(d, "web", "/etc/hosts")
