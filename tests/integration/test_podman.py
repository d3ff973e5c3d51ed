"""Issue: podman — hooks.d files from `tether oci hooks-dir`; podman containers get
addresses, links and served files exactly as with runc, with only
`--network none` and annotations: no `--hooks-dir`, no `-v` (the hook mounts
the files, issue 11).

Every test has its own tether daemon and its own podman: storage, run root,
tmp dir, network config dir, cgroup parent and containers.conf
(CONTAINERS_CONF), runc as the runtime, cgroupfs, file events. The hooks.d
files go where this podman reads them by default
(/usr/share/containers/oci/hooks.d), under names of the test's own and with
a `when` that matches only its containers (annotation io.tether.test=TAG).
The rootfs is a copy of the busybox one (podman writes mount points into
it); no image is ever pulled. `Podman.close()` removes every container,
process, mount, cgroup, hooks file and directory it made, also when a test
failed.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fused import podman as tether_podman
from harness import HOOK, TETHER, Daemon, address_in_hosts, bridge_ports, serve, sh, wait_for

PODMAN = shutil.which("podman")
SKIP = "podman is not installed: `make test` installs it (apt: podman runc)"
SLEEP = ["sleep", "1000000"]
LOCAL = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
ROOT = Path(__file__).resolve().parents[2]
CGROUPS = Path("/sys/fs/cgroup")
# podman makes these whatever its flags (netavark's run dir, runc's default
# root): removed after this module when it made them and they are empty
GLOBAL_DIRS = [Path("/run/containers/networks"), Path("/run/containers"), Path("/run/runc")]


def _nofile_hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def _nproc() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return 32768 if hard == resource.RLIM_INFINITY else min(32768, hard)


def containers_conf() -> str:
    """podman's default nofile (1048576) is above this machine's hard limit
    (runc then fails: "error setting rlimit type 7"); crun, if installed, would
    be its default runtime; file locks keep /dev/shm/libpod_lock out."""
    n = _nofile_hard()
    p = _nproc()
    return f"""[containers]
default_ulimits = ["nofile={n}:{n}", "nproc={p}:{p}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
"""


class Podman:
    """podman isolated under one temporary directory (see the module docstring)."""

    def __init__(self, d: Daemon, rootfs: Path) -> None:
        self.d = d
        self.dir = Path(tempfile.mkdtemp(prefix=f"tether-podman-{d.tag}-"))
        self.rootfs = self.dir / "rootfs"
        shutil.copytree(rootfs, self.rootfs, symlinks=True)
        self.hooks = self.dir / "hooks.d"
        self.cgroup_parent = f"/tether-podman-{d.tag}"
        conf = self.dir / "containers.conf"
        conf.write_text(containers_conf())
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.flags = [
            "--root", str(self.dir / "root"),
            "--runroot", str(self.dir / "runroot"),
            "--tmpdir", str(self.dir / "tmp"),
            "--network-config-dir", str(self.dir / "networks"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--runtime", "runc",
            "--events-backend", "file",
        ]
        self.ids: dict[str, str] = {}
        self.installed: list[Path] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 60):
        return sh(PODMAN, *self.flags, *args, check=check, timeout=timeout, env=self.env)

    def install_hooks(self) -> list[Path]:
        """`tether oci hooks-dir` into a directory of the test's, then each
        file into podman's default directory, named for this test and
        matching only its containers."""
        self.d.cli("oci", "hooks-dir", str(self.hooks))
        (default,) = tether_podman.hooks_dirs(self.env)  # this containers.conf sets none
        assert default == "/usr/share/containers/oci/hooks.d"
        foreign = [f.path for f in tether_podman.find_hooks(default) if not f.path.name.startswith("tether-test-")]
        assert not foreign, (
            f"{foreign[0]} (another tether installation's) would run for the test's containers too: "
            "remove it (packaging/install.sh --uninstall) before `make test`"
        )
        Path(default).mkdir(parents=True, exist_ok=True)
        for f in sorted(self.hooks.iterdir()):
            content = json.loads(f.read_text())
            content["when"]["annotations"][r"^io\.tether\.test$"] = f"^{self.d.tag}$"
            dest = Path(default) / f"tether-test-{self.d.tag}-{f.name}"
            dest.write_text(json.dumps(content))
            self.installed.append(dest)
        return self.installed

    def run(
        self,
        name: str,
        cmd: list[str] | None = None,
        links: tuple[str, ...] = (),
        expose: tuple[str, ...] = (),
        tether: bool = True,
        check: bool = True,
    ):
        """`podman run -d` as a user would for tether: network none, the
        annotations, and the served files bound read-only."""
        args = ["run", "-d", "--name", name, "--network", "none", "--cgroup-parent", self.cgroup_parent]
        if tether:  # annotations only: the hook mounts the files
            args += ["--annotation", f"io.tether.name={name}", "--annotation", f"io.tether.test={self.d.tag}"]
            if links:
                args += ["--annotation", f"io.tether.links={','.join(links)}"]
            if expose:
                args += ["--annotation", f"io.tether.expose={','.join(expose)}"]
        p = self(*args, "--rootfs", str(self.rootfs), *(cmd or serve(name)), check=False)
        cid = self("inspect", "--format", "{{.Id}}", name, check=False).stdout.strip()
        if cid:
            self.ids[name] = cid
        if check and p.returncode != 0:
            raise AssertionError(f"podman run {name} failed: {p.stderr}\n--- daemon log:\n{self.d.log.read_text()[-3000:]}")
        return p

    def exec(self, name: str, *cmd: str, check: bool = True):
        return self("exec", name, *cmd, check=check, timeout=30)

    def status(self, name: str) -> str | None:
        p = self("inspect", "--format", "{{.State.Status}}", name, check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    def spec(self, name: str) -> dict:
        """The OCI config.json podman gave runc for this container."""
        (path,) = (self.dir / "root").glob(f"*-containers/{self.ids[name]}/userdata/config.json")
        return json.loads(path.read_text())

    # --- cleanup --------------------------------------------------------------
    def _pids(self) -> list[int]:
        """conmon and container processes that belong to this podman."""
        mine = [str(self.dir), *self.ids.values()]
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(m in cmdline for m in mine) and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
        return pids

    def close(self) -> None:
        """Best effort, every step whatever the one before did."""
        ids = set(self.ids.values())
        try:
            if (self.dir / "root").exists():
                ids |= set(self("ps", "-a", "-q", "--no-trunc", check=False).stdout.split())
                for cid in ids:
                    self("rm", "-f", "-t", "0", cid, check=False)
        except subprocess.TimeoutExpired:
            pass
        for cid in ids:  # whatever podman could not remove (podman's runc root is runc's default)
            sh("runc", "delete", "-f", cid, check=False)
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self._pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(self.dir) + "/")
        ]
        for m in sorted(mounts, key=len, reverse=True):
            sh("umount", "-l", m, check=False)
        for hierarchy in CGROUPS.iterdir() if CGROUPS.is_dir() else []:
            top = hierarchy / self.cgroup_parent.lstrip("/")
            if top.is_dir():
                subs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
                for cg in [*subs, top]:
                    try:
                        os.rmdir(cg)
                    except OSError:
                        pass
        for f in self.installed:
            f.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _podman_global_dirs():
    before = {p: p.exists() for p in GLOBAL_DIRS}
    yield
    for p in GLOBAL_DIRS:
        if not before[p] and p.is_dir() and not any(p.iterdir()):
            p.rmdir()


@pytest.fixture
def pm(rootfs):
    if PODMAN is None:
        pytest.skip(SKIP)
    d = Daemon(rootfs, strategy="facade")
    p = Podman(d, rootfs)
    try:
        d.start()
        p.install_hooks()
        yield p
    finally:
        try:
            p.close()
        finally:
            d.close()


def hosts_of(p: Podman, name: str) -> str:
    return p.exec(name, "cat", "/etc/hosts").stdout


def facade_of(p: Podman, consumer: str, alias: str) -> str:
    return address_in_hosts(hosts_of(p, consumer), alias)


def ask(p: Podman, name: str, host: str, port: int = 5432) -> str:
    return p.exec(name, "nc", "-w", "3", host, str(port), check=False).stdout.strip()


def inside_addr(p: Podman, name: str) -> tuple[str, str]:
    mac = p.exec(name, "cat", "/sys/class/net/eth0/address").stdout.strip()
    out = p.exec(name, "ip", "-4", "-o", "addr", "show", "eth0").stdout.split()
    return out[out.index("inet") + 1].split("/")[0], mac


def state(p: Podman, name: str) -> str:
    return p.d.container(name)["state"]


# --- the hooks.d files ----------------------------------------------------------


def test_hooks_dir_writes_valid_files_idempotently(tmp_path):
    d = tmp_path / "hooks.d"
    cfg = tmp_path / "tether.toml"
    cfg.write_text('run_dir = "/run/tether-x"\n')
    out = sh(TETHER, "--config", str(cfg), "oci", "hooks-dir", str(d)).stdout
    assert out.split("\n")[:2] == [f"wrote {d}/tether-createruntime.json", f"wrote {d}/tether-poststop.json"]
    files = {f.name: json.loads(f.read_text()) for f in d.iterdir()}
    assert set(files) == {"tether-createruntime.json", "tether-poststop.json"}
    for name, stage in (("tether-createruntime.json", "createRuntime"), ("tether-poststop.json", "poststop")):
        h = files[name]
        assert h["version"] == "1.0.0" and h["stages"] == [stage]
        assert h["hook"]["path"] == HOOK and os.path.isabs(h["hook"]["path"])
        assert h["hook"]["args"] == ["tether-hook", "--config", str(cfg.resolve()), stage]
        assert h["when"] == {"annotations": {r"^io\.tether\.": ".*"}}
        assert 0 < h["hook"]["timeout"] <= 30
        assert (d / name).stat().st_mode & 0o777 == 0o644
    mtimes = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    again = json.loads(sh(TETHER, "--config", str(cfg), "--json", "oci", "hooks-dir", str(d)).stdout)
    assert [f["changed"] for f in again["files"]] == [False, False]
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == mtimes
    assert sorted(f.name for f in d.iterdir()) == ["tether-createruntime.json", "tether-poststop.json"]
    # the template in oci-config/ is the same, with example paths
    template = json.loads((ROOT / "oci-config" / "tether-hooks.json").read_text())
    for name, h in files.items():
        t = template[name]
        assert t["hook"]["args"][-1] == h["hook"]["args"][-1]
        assert {k: v for k, v in t.items() if k != "hook"} == {k: v for k, v in h.items() if k != "hook"}
        assert t["hook"]["timeout"] == h["hook"]["timeout"]
    r = sh(TETHER, "oci", "hooks-dir", "/proc/no/such/dir", check=False)
    assert r.returncode == 1 and r.stderr.startswith("tether: cannot write hooks into /proc/no/such/dir")


# --- podman containers ----------------------------------------------------------


def test_links_resolve_through_served_hosts(pm):
    p, d = pm, pm.d
    p.run("db", expose=("5432",))
    p.run("web", SLEEP, links=("db:database",))
    web, db = d.container("web"), d.container("db")
    assert web["state"] == db["state"] == "running"
    assert web["id"] == p.ids["web"]  # podman's container id
    assert web["links"] == ["database->db"]
    facade = facade_of(p, "web", "database")
    assert facade != db["ip"]
    assert hosts_of(p, "web") == LOCAL + f"{web['ip']}\tweb\n{facade}\tdatabase db\n"
    assert p.exec("web", "cat", "/etc/tether/ports").stdout == f"database\ttcp\t5432\t{facade}\n"
    assert p.exec("web", "cat", "/etc/tether/env").stdout == "DOCKER_LINK_PORT_DATABASE=5432\n"
    assert p.exec("web", "cat", "/etc/resolv.conf").stdout.startswith(f"nameserver {d.gateway}")
    assert inside_addr(p, "web") == (web["ip"], web["mac"])
    # podman's own network stayed out: lo and tether's eth0, nothing else
    links = p.exec("web", "ip", "-o", "link").stdout
    assert sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M)) == ["eth0", "lo"]
    assert ask(p, "web", "database") == "db"
    assert ask(p, "web", "db") == "db"  # the target's name is on the link's line too
    # the hooks came from podman's default hooks dir, into the spec podman gave runc
    spec = p.spec("web")
    assert [h["args"][-1] for h in spec["hooks"]["createRuntime"]] == ["createRuntime"]
    assert "poststop" not in spec["hooks"]  # podman runs poststop itself
    # no -v: podman bound its own /etc/hosts (with --network none, no resolv.conf);
    # the hook mounted tether's over it
    own = {m["destination"]: m["source"] for m in spec["mounts"]}
    assert not any(str(d.run_dir) in src for src in own.values())
    assert own["/etc/hosts"].endswith("/userdata/hosts")
    points = [ln.split()[4] for ln in p.exec("web", "cat", "/proc/self/mountinfo").stdout.splitlines()]
    assert points.count("/etc/hosts") == 2  # podman's, tether's on top
    # tether's /etc/hosts: it changes on retarget
    p.run("db2", expose=("5432",))
    d.cli("link", "retarget", "web", "database", "db2")
    assert hosts_of(p, "web") == LOCAL + f"{web['ip']}\tweb\n{facade}\tdatabase db2\n"
    assert ask(p, "web", "database") == "db2"


def test_stop_start_keeps_the_address(pm):
    p, d = pm, pm.d
    p.run("db", expose=("5432",))
    p.run("web", SLEEP, links=("db:database",))
    first = inside_addr(p, "db")
    assert first == (d.container("db")["ip"], d.container("db")["mac"])
    p("stop", "-t", "0", "db")
    # podman runs poststop itself, with an almost empty environment: the
    # absolute path and --config in the hooks.d file reach this test's daemon
    wait_for(lambda: state(p, "db") == "stopped", timeout=15, what="db stopped in tether")
    db = d.container("db")
    assert db["stopped_at"] and db["ip"] == first[0]
    assert bridge_ports(d.bridge) == [d.container("web")["veth"]]
    p("start", "db")
    wait_for(lambda: state(p, "db") == "running", what="db running again")
    assert inside_addr(p, "db") == first
    assert d.container("db")["id"] == p.ids["db"]
    assert wait_for(lambda: ask(p, "web", "database") == "db", timeout=10, what="web reaches db again")


def test_podman_start_alone_gives_the_network_back(pm):
    """A container that exited (podman-restart, systemd units) and is started
    with a plain `podman start`: no flags, the default hooks dir."""
    p, d = pm, pm.d
    p.run("db", expose=("5432",))
    p.run("brief", ["sh", "-c", "sleep 2; nc -ll -p 5432 -e echo brief"], links=("db:database",))
    first = d.container("brief")
    wait_for(lambda: state(p, "brief") == "running" and p.status("brief") == "running", what="brief running")
    p("kill", "brief")
    wait_for(lambda: state(p, "brief") == "stopped", timeout=20, what="brief stopped in tether")
    p("start", "brief")
    wait_for(lambda: state(p, "brief") == "running", timeout=15, what="brief running again in tether")
    assert inside_addr(p, "brief") == (first["ip"], first["mac"])
    assert hosts_of(p, "brief").endswith(f"\tdatabase db\n")
    assert ask(p, "brief", "database") == "db"
    assert not [x for x in d.cli_json("ps", "-a") if x["name"] == "brief" and x["state"] != "running"]


def test_a_podman_container_whose_hook_did_not_run_is_flagged(pm):
    """tether's annotations, but a start without tether's hook (here: the test's
    hooks.d files do not match it): runc runs it, tether never registered it,
    and `tether ps` says so with the reason."""
    p, d = pm, pm.d
    p.run("seen", SLEEP)  # tether learns podman's runc root from this one
    args = ["run", "-d", "--name", "unseen", "--network", "none", "--cgroup-parent", p.cgroup_parent,
            "--annotation", "io.tether.name=unseen", "--rootfs", str(p.rootfs), *SLEEP]
    p(*args)
    p.ids["unseen"] = p("inspect", "--format", "{{.Id}}", "unseen").stdout.strip()
    r = d.cli("ps")
    (w,) = [ln for ln in r.stderr.splitlines() if ln.startswith("tether: warning: unseen:")]
    assert "has it running, tether never registered it" in w and "createRuntime hook did not run" in w
    assert [c["name"] for c in json.loads(d.cli("--json", "ps").stdout)] == ["seen"]


def test_container_exiting_by_itself_is_marked_stopped(pm):
    """No `podman stop`: conmon's exit command (`podman container cleanup`) runs poststop."""
    p, d = pm, pm.d
    p.run("brief", ["sleep", "1"])
    assert state(p, "brief") == "running"
    wait_for(lambda: state(p, "brief") == "stopped", timeout=20, what="poststop from podman's clean-up")
    assert re.search(r"stopped brief \(id [0-9a-f]{64}\)", d.log.read_text())


def test_move_while_both_run(pm):
    p, d = pm, pm.d
    p.run("db", expose=("5432",))
    p.run("db2", expose=("5432",))
    p.run("web", SLEEP, links=("db:database",))
    facade = facade_of(p, "web", "database")
    started = p("inspect", "--format", "{{.State.StartedAt}}", "web").stdout
    assert ask(p, "web", "database") == "db"
    r = d.cli_json("move", "db", "db2")
    assert (r["old"], r["new"], r["links"]) == ("db", "db2", 1)
    assert ask(p, "web", "database") == "db2"
    assert ask(p, "web", facade) == "db2"  # an address an application cached
    assert hosts_of(p, "web") == LOCAL + f"{d.container('web')['ip']}\tweb\n{facade}\tdatabase db2\n"
    assert d.container("web")["links"] == ["database->db2"]
    assert p("inspect", "--format", "{{.State.StartedAt}}", "web").stdout == started  # no restart
    assert p.status("web") == "running"


def test_podman_rm_then_tether_rm_frees_the_lease(pm):
    p, d = pm, pm.d
    p.run("db", expose=("5432",))
    ip = d.container("db")["ip"]
    assert ip in [l["lease"] for l in d.cli_json("leases")]
    r = d.cli("rm", "db", check=False)
    assert r.returncode == 1 and "running" in r.stderr
    p("rm", "-f", "-t", "0", "db")
    assert p("ps", "-a", "-q").stdout.split() == []
    wait_for(lambda: state(p, "db") == "stopped", timeout=15, what="db stopped in tether")
    assert ip in [l["lease"] for l in d.cli_json("leases")]  # stopped: the lease stays
    d.cli("rm", "db")
    assert ip not in [l["lease"] for l in d.cli_json("leases")]
    assert "db" not in [c["name"] for c in d.cli_json("ps", "-a")]
    assert bridge_ports(d.bridge) == []
    # the name starts afresh, at the lowest free address: the one just freed
    p.run("other", SLEEP)
    assert d.container("other")["ip"] == ip


def test_container_without_tether_annotations_is_untouched(pm):
    p, d = pm, pm.d
    p.run("plain", SLEEP, tether=False)
    assert p.status("plain") == "running"
    assert not any("tether-hook" in h["path"] for hs in p.spec("plain").get("hooks", {}).values() for h in hs)
    assert p.exec("plain", "ip", "-o", "link").stdout.split(":")[1].strip() == "lo"
    assert len(p.exec("plain", "ip", "-o", "link").stdout.splitlines()) == 1
    assert d.cli_json("ps", "-a") == [] and bridge_ports(d.bridge) == []
    p("stop", "-t", "0", "plain")
    p("rm", "plain")
    assert "plain" not in d.log.read_text()
    # the same podman, hooks dir and daemon do manage an annotated container
    p.run("managed", SLEEP)
    assert state(p, "managed") == "running"


def test_bad_annotation_fails_the_start_and_leaves_nothing(pm):
    p, d = pm, pm.d
    r = p.run("bad", SLEEP, links=("db:Not_A_Label",), check=False)
    assert r.returncode != 0
    assert "io.tether.links" in r.stderr and "tether-hook" in r.stderr
    assert p.status("bad") != "running"
    assert d.cli_json("ps", "-a") == [] and bridge_ports(d.bridge) == []
