"""Issue: systemd and files — the unit verifies, the daemon notifies systemd when ready."""
from __future__ import annotations

import array
import os
import shutil
import socket
import subprocess
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
