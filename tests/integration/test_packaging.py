"""Issue: systemd and files — the unit verifies, the daemon notifies systemd when ready;
packaging/install.sh installs per runtime, keeps what the admin changed, and uninstalls."""
from __future__ import annotations

import array
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness import FUSED, Daemon, sh

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed here")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    unit = (ROOT / "packaging" / "tether-fused.service").read_text()
    assert "Type=notify" in unit and "KillMode=process" in unit and "Restart=always" in unit
    assert "FileDescriptorStoreMax=4" in unit  # the FUSE connection and its mount clone
    # verify checks that ExecStart exists: point it at this installation
    (tmp_path / "tether-fused.service").write_text(unit.replace("/usr/local/bin/tether-fused", FUSED))
    r = sh("systemd-analyze", "verify", str(tmp_path / "tether-fused.service"), check=False)
    assert r.returncode == 0, r.stderr


def test_tmpfiles_entry_is_root_only():
    lines = [l.split() for l in (ROOT / "packaging" / "tether.tmpfiles.conf").read_text().splitlines() if l and not l.startswith("#")]
    assert ["d", "/run/tether", "0700", "root", "root", "-"] in lines
    assert ["d", "/var/lib/tether", "0700", "root", "root", "-"] in lines


def test_ready_notification_after_mount_and_socket(rootfs, tmp_path):
    """Type=notify: READY=1 arrives once the mount and the socket are up."""
    with Daemon(rootfs) as d:
        notify = str(tmp_path / "notify.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(notify)
        s.settimeout(15)
        env = dict(os.environ, NOTIFY_SOCKET=notify)
        log = open(d.log, "a")
        d.proc = subprocess.Popen([FUSED, "--config", str(d.config)], env=env, stdout=log, stderr=subprocess.STDOUT)
        d.pids.add(d.proc.pid)
        try:
            # first the FUSE connection goes into systemd's fd store, with the fd
            stored = {}
            while True:
                data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
                msg = data.decode()
                if "READY=1" in msg:
                    break
                assert msg.startswith("FDSTORE=1\nFDNAME="), msg
                fds = [array.array("i", payload)[0] for lvl, kind, payload in anc if kind == socket.SCM_RIGHTS]
                assert len(fds) == 1
                stored[msg.split("FDNAME=")[1].split("\n")[0]] = os.readlink(f"/proc/self/fd/{fds[0]}")
                os.close(fds[0])
            assert stored.get("fuse") == "/dev/fuse", stored
            # at that moment: socket answers, files are served
            assert d.sock.exists() and os.path.ismount(d.run_dir / "fs")
            assert d.cli_json("ps") == []
            d.stop()
            assert "STOPPING=1" in s.recv(4096).decode()
        finally:
            s.close()


# --- packaging/install.sh, into a temporary root -------------------------------------
INSTALL = ROOT / "packaging" / "install.sh"
VENV = Path(sys.executable).parent.parent  # the venv running the tests: its packages, not PyPI's
UNIT = "etc/systemd/system/tether-fused.service"
TMPFILES = "etc/tmpfiles.d/tether.conf"
HOOKS = "usr/share/containers/oci/hooks.d"
HOOK_FILES = ("tether-createruntime.json", "tether-poststop.json")
# the real system paths install.sh writes: the tests must leave them as they are
SYSTEM = ["/opt/tether", "/etc/tether", "/etc/systemd/system/tether-fused.service", "/etc/tmpfiles.d/tether.conf",
          "/usr/local/bin/tether", "/usr/local/bin/tether-fused", "/usr/local/bin/tether-hook",
          *(f"{d}/{f}" for d in ("/usr/share/containers/oci/hooks.d", "/etc/containers/oci/hooks.d") for f in HOOK_FILES)]


def _version(python: str) -> str:
    return sh(python, "-c", "import sys; print(sys.version_info[:2])").stdout


needs_same_python = pytest.mark.skipif(
    not Path("/usr/bin/python3").exists() or _version("/usr/bin/python3") != _version(sys.executable),
    reason="install.sh --deps-from needs the test venv's Python version in /usr/bin/python3",
)


def system_state() -> dict[str, tuple | None]:
    out = {}
    for p in SYSTEM:
        try:
            st = os.lstat(p)
            out[p] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            out[p] = None
    return out


@pytest.fixture
def sysroot(tmp_path):
    """A temporary root for install.sh; the real system paths are unchanged after."""
    before = system_state()
    yield tmp_path / "root"
    assert system_state() == before


def install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, ROOT=str(root), TETHER_SKIP_APT="1")
    env.pop("PREFIX", None)
    return sh("bash", str(INSTALL), *args, *(() if "--uninstall" in args else ("--deps-from", str(VENV))),
              env=env, check=check, timeout=120)


def test_help_and_an_unknown_flag():
    r = sh("bash", str(INSTALL), "--help")
    assert "--runtime runc|podman|both" in r.stdout and "--uninstall" in r.stdout and "ROOT" in r.stdout
    r = sh("bash", str(INSTALL), "--frobnicate", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["install.sh: unknown option --frobnicate (see --help)"]
    r = sh("bash", str(INSTALL), "--runtime", "docker", check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


def test_each_runtime_gets_only_its_packages(sysroot):
    def packages(runtime: str) -> list[str]:
        r = install(sysroot, "--runtime", runtime, "--dry-run")
        line = next(l for l in r.stdout.splitlines() if l.startswith(f"runtime: {runtime}; packages: "))
        return line.split("packages: ")[1].split(";")[0].split()

    runc = packages("runc")
    assert "runc" in runc and "python3-iptables" in runc  # Debian's build: nothing compiled at install
    assert not {"podman", "gcc", "python3-dev", "busybox-static"} & set(runc), runc
    assert set(packages("podman")) == set(runc) | {"podman"}
    assert set(packages("both")) == set(runc) | {"podman"}
    assert not sysroot.exists()  # --dry-run changes nothing


@needs_same_python
def test_install_for_runc(sysroot):
    r = install(sysroot, "--runtime", "runc")
    venv = sysroot / "opt/tether/venv"
    for c in ("tether", "tether-fused", "tether-hook"):
        link = sysroot / "usr/local/bin" / c
        assert os.readlink(link) == f"{venv}/bin/{c}"
    assert sh(str(sysroot / "usr/local/bin/tether"), "--version").stdout.startswith("tether ")
    assert (sysroot / UNIT).read_text() == (ROOT / "packaging/tether-fused.service").read_text()
    assert (sysroot / TMPFILES).read_text() == (ROOT / "packaging/tether.tmpfiles.conf").read_text()
    assert (sysroot / "etc/tether/tether.toml").read_text() == (ROOT / "oci-config/tether.toml.example").read_text()
    assert not (sysroot / HOOKS).exists() and "tether oci patch" in r.stdout  # runc: no podman hooks


@needs_same_python
def test_install_for_podman_writes_the_hooks_files(sysroot):
    r = install(sysroot, "--runtime", "podman")
    hook = f"{sysroot}/opt/tether/venv/bin/tether-hook"
    for name, stage in zip(HOOK_FILES, ("createRuntime", "poststop")):
        content = json.loads((sysroot / HOOKS / name).read_text())
        assert content["hook"]["path"] == hook and os.access(hook, os.X_OK)
        assert content["hook"]["args"] == ["tether-hook", "--config", f"{sysroot}/etc/tether/tether.toml", stage]
        assert f"wrote {sysroot / HOOKS / name}" in r.stdout


@needs_same_python
def test_install_twice_changes_nothing(sysroot):
    install(sysroot, "--runtime", "podman")
    (sysroot / "etc/tether/tether.toml").write_text("# mine\n")
    r = install(sysroot, "--runtime", "podman")
    for f in (UNIT, TMPFILES, f"{HOOKS}/{HOOK_FILES[0]}", f"{HOOKS}/{HOOK_FILES[1]}"):
        assert f"unchanged {sysroot / f}" in r.stdout, r.stdout
    assert f"kept {sysroot}/etc/tether/tether.toml" in r.stdout
    assert (sysroot / "etc/tether/tether.toml").read_text() == "# mine\n"
    assert not list(sysroot.rglob("*.tether-new")) and not list(sysroot.rglob("*.tether-old"))


@needs_same_python
def test_a_changed_unit_is_kept_and_ours_put_beside_it(sysroot):
    install(sysroot, "--runtime", "runc")
    unit = sysroot / UNIT
    ours = unit.read_text()
    unit.write_text(ours + "# the admin's line\n")
    r = install(sysroot, "--runtime", "runc")
    assert unit.read_text() == ours + "# the admin's line\n"
    assert Path(f"{unit}.tether-new").read_text() == ours
    line = next(l for l in r.stdout.splitlines() if l.startswith(f"kept {unit}"))
    assert "you changed it" in line and f"{unit}.tether-new" in line and "--force" in line
    # again: still theirs, still said
    assert f"kept {unit}" in install(sysroot, "--runtime", "runc").stdout
    r = install(sysroot, "--runtime", "runc", "--force")
    assert unit.read_text() == ours and f"replaced {unit} (--force)" in r.stdout
    assert Path(f"{unit}.tether-old").read_text() == ours + "# the admin's line\n"
    assert not Path(f"{unit}.tether-new").exists()


@needs_same_python
def test_a_unit_as_we_wrote_it_last_time_is_updated(sysroot):
    """An older unit of ours (its checksum recorded by the last install) is no change of the admin's."""
    install(sysroot, "--runtime", "runc")
    unit = sysroot / UNIT
    unit.write_text("[Unit]\nDescription=tether, an older install\n")
    sums = sysroot / "opt/tether/installed.sha256"
    digest = sh("sha256sum", str(unit)).stdout.split()[0]
    sums.write_text("".join(f"{digest}  /{UNIT}\n" if l.endswith(f" /{UNIT}") else l + "\n"
                            for l in sums.read_text().splitlines()))
    r = install(sysroot, "--runtime", "runc")
    assert f"updated {unit}" in r.stdout and unit.read_text() == (ROOT / "packaging/tether-fused.service").read_text()
    assert not Path(f"{unit}.tether-new").exists()


@needs_same_python
def test_uninstall_removes_what_it_installed_and_keeps_config_and_state(sysroot):
    install(sysroot, "--runtime", "podman")
    state = sysroot / "var/lib/tether"
    state.mkdir(parents=True)
    (state / "tether.db").write_text("")
    # somebody else's hooks file (another tether-hook) and an old one of ours in /etc
    other = sysroot / "etc/containers/oci/hooks.d"
    other.mkdir(parents=True)
    (other / HOOK_FILES[0]).write_text(json.dumps({"hook": {"path": "/usr/bin/tether-hook"}}))
    (other / HOOK_FILES[1]).write_text((sysroot / HOOKS / HOOK_FILES[1]).read_text())
    r = install(sysroot, "--uninstall")
    lines = r.stdout.splitlines()
    for f in (*(f"{HOOKS}/{h}" for h in HOOK_FILES), f"etc/containers/oci/hooks.d/{HOOK_FILES[1]}",
              "usr/local/bin/tether", "usr/local/bin/tether-fused", "usr/local/bin/tether-hook",
              UNIT, TMPFILES, "opt/tether/venv"):
        assert f"removed {sysroot / f}" in lines, r.stdout
        assert not os.path.lexists(sysroot / f)
    assert any(l.startswith(f"kept {other / HOOK_FILES[0]}") for l in lines)
    assert any(l.startswith(f"kept {sysroot}/etc/tether/tether.toml") for l in lines)
    assert any(l.startswith(f"kept {state}") for l in lines)
    assert (sysroot / "etc/tether/tether.toml").exists() and (state / "tether.db").exists()
    assert not (sysroot / "opt/tether").exists()
    assert len(lines) == 12, r.stdout  # one line per thing removed or kept
