"""tether doctor without root: output, exit status, the guard, the parsers."""
from __future__ import annotations

import json
import time

import pytest

from fused import cli, doctor
from fused.doctor import FAIL, OK, WARN, Result

GOOD = [
    Result("bridge", OK, "tether0 is up with 10.213.0.1/16"),
    Result("iptables", WARN, "host `iptables` is nf_tables", "tether's rules are in the legacy tables: see them with iptables-legacy -t nat -S"),
]
BAD = GOOD + [
    Result(
        "daemon",
        FAIL,
        "no socket at /run/tether/fused.sock",
        "start it with `systemctl start tether-fused` or `tether-fused --config FILE`",
    )
]


def test_one_line_per_check_status_name_detail_and_the_fix_unless_ok():
    lines = doctor.render(BAD, as_json=False).splitlines()
    assert lines[0] == "ok    bridge        tether0 is up with 10.213.0.1/16"
    assert lines[1] == (
        "warn  iptables      host `iptables` is nf_tables: "
        "tether's rules are in the legacy tables: see them with iptables-legacy -t nat -S"
    )
    assert lines[2] == (
        "FAIL  daemon        no socket at /run/tether/fused.sock: "
        "start it with `systemctl start tether-fused` or `tether-fused --config FILE`"
    )
    assert lines[3] == "3 checks: 1 ok, 1 warn, 1 failed: tether is not usable until the FAIL lines are fixed"
    assert len(lines) == 4


def test_an_ok_line_never_shows_a_fix():
    assert doctor.line(Result("x", OK, "fine", "unused")) == "ok    x             fine"


def test_exit_status_is_zero_iff_nothing_failed_and_warnings_are_usable():
    assert doctor.exit_code(GOOD) == 0
    assert doctor.exit_code(BAD) == 1
    assert doctor.exit_code([Result("a", WARN, "w", "f")]) == 0
    assert doctor.exit_code([Result("a", FAIL, "f", "x")]) == 1
    assert doctor.summary(GOOD).endswith("tether is usable (see the warn lines)")
    assert doctor.summary(GOOD[:1]) == "1 checks: 1 ok, 0 warn, 0 failed: tether is usable"


def test_json_is_a_list_with_stable_keys():
    items = json.loads(doctor.render(BAD, as_json=True))
    assert [set(i) for i in items] == [{"name", "ok", "status", "detail", "fix"}] * 3
    assert [(i["name"], i["ok"], i["status"]) for i in items] == [
        ("bridge", True, "ok"),
        ("iptables", True, "warn"),
        ("daemon", False, "fail"),
    ]
    assert items[2]["fix"].startswith("start it with")


def test_a_check_that_hangs_becomes_a_fail_line_in_time():
    t0 = time.monotonic()
    r = doctor.guarded("mount", lambda: time.sleep(5) or Result("mount", OK, "x"), timeout=0.2)
    assert time.monotonic() - t0 < 1
    assert r.status == FAIL and r.name == "mount" and "did not finish within 0.2 s" in r.detail


def test_a_check_that_crashes_becomes_a_fail_line():
    r = doctor.guarded("store", lambda: 1 / 0)
    assert r.status == FAIL and "ZeroDivisionError" in r.detail and r.fix


def test_a_subprocess_that_hangs_is_cut_off():
    t0 = time.monotonic()
    r = doctor.run_cmd(["sleep", "10"], timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert r.rc is None and "did not finish" in r.err
    assert doctor.run_cmd(["no-such-command-xyz"]).rc is None


@pytest.fixture
def fake_checks(monkeypatch):
    def install(results):
        monkeypatch.setattr(doctor.Doctor, "checks", lambda self: [(r.name, (lambda r=r: r)) for r in results])

    return install


def test_cli_doctor_exit_status_and_json(tmp_path, fake_checks, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'run_dir = "{tmp_path}/run"\n')
    fake_checks(GOOD)
    assert cli.run(["--config", str(cfg), "doctor"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok    config        {cfg.resolve()}"
    assert out[1].startswith("ok    bridge") and out[2].startswith("warn  iptables")
    fake_checks(BAD)
    assert cli.run(["--config", str(cfg), "--json", "doctor"]) == 1
    items = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in items] == ["config", "bridge", "iptables", "daemon"]
    # --json after the subcommand works too
    assert cli.run(["doctor", "--config", str(cfg), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[-1]["status"] == "fail"


def test_cli_doctor_reports_a_bad_config_as_a_fail_line(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text("[network]\nbridge = 'has space'\n")
    assert cli.run(["--config", str(cfg), "doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL  config        config ") and "network.bridge" in out[0]
    assert out[-1].startswith("1 checks: 0 ok, 0 warn, 1 failed")


def test_mountinfo_finds_the_top_mount_with_escaped_paths():
    info = (
        "22 1 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw\n"
        "90 22 0:50 / /run/my\\040dir/fs ro,nosuid,nodev - fuse.tether tether rw,user_id=0\n"
        "91 90 0:51 / /run/my\\040dir/fs rw - tmpfs none rw\n"
    )
    assert doctor.mounts_at(info, "/run/my dir/fs") == [("fuse.tether", "tether"), ("tmpfs", "none")]
    assert doctor.mounts_at(info, "/run/tether/fs") == []


def test_parsers():
    assert doctor.iptables_backend("iptables v1.8.9 (nf_tables)") == "nf_tables"
    assert doctor.iptables_backend("iptables v1.8.9 (legacy)\n") == "legacy"
    assert doctor.iptables_backend("iptables v1.4.21") is None
    ss = (
        'udp UNCONN 0 0 10.213.0.1:53 0.0.0.0:* users:(("tether-fused",pid=7,fd=9))\n'
        'tcp LISTEN 0 128 10.213.0.1:53 0.0.0.0:* users:(("tether-fused",pid=7,fd=10))\n'
        "tcp LISTEN 0 128 0.0.0.0:5353 0.0.0.0:*\n"
        "udp UNCONN 0 0 [::1]%lo:53 [::]:*\n"
    )
    assert doctor.listeners(ss, 53) == [
        ("udp", "10.213.0.1", "tether-fused"),
        ("tcp", "10.213.0.1", "tether-fused"),
        ("udp", "::1", ""),
    ]


# --- podman-hooks: read where podman reads -------------------------------------


@pytest.fixture
def podman_dirs(tmp_path, monkeypatch):
    """podman reads `reads` only; `stale` is a place it does not read."""
    from fused import config as config_mod
    from fused import podman

    reads, stale = tmp_path / "reads", tmp_path / "stale"
    conf = tmp_path / "containers.conf"
    conf.write_text(f'[engine]\nhooks_dir = ["{reads}"]\n')
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    monkeypatch.setattr(podman, "OTHER_HOOKS_DIRS", [str(stale)])
    monkeypatch.setattr(podman, "DEFAULT_HOOKS_DIRS", [str(tmp_path / "default")])
    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/usr/bin/podman" if name == "podman" else None)
    cfg = config_mod.Config(source=tmp_path / "t.toml")
    return doctor.Doctor(cfg), reads, stale, cfg


def test_podman_hooks_in_a_directory_podman_does_not_read_fail_with_the_fix(podman_dirs, tmp_path):
    from fused import podman

    doc, reads, stale, cfg = podman_dirs
    hook = tmp_path / "tether-hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    podman.write_hooks_dir(stale, str(hook), cfg.source)
    r = doc.podman_hooks()
    assert r.status == FAIL
    assert r.detail == f"tether's hook is in {stale}/tether-createruntime.json, but podman reads hooks only from {reads}"
    assert r.fix == f"run `tether oci hooks-dir --config {cfg.source}` (it writes into {reads}), then remove {stale}/tether-createruntime.json"
    podman.write_hooks_dir(reads, str(hook), cfg.source)
    assert doc.podman_hooks().status == OK
    hook.chmod(0o644)  # a hook podman cannot run
    r = doc.podman_hooks()
    assert r.status == FAIL and "not an executable" in r.detail


def test_podman_not_installed_is_fine(monkeypatch):
    from fused import config as config_mod

    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    r = doctor.Doctor(config_mod.Config()).podman_hooks()
    assert r.status == OK and "not installed" in r.detail


# --- containers: each running container's served files ----------------------------
def finding(name: str, state: str, **kw):
    from fused import container_files as cf

    return cf.Finding(name, f"id-{name}", state, kw.pop("detail", f"{name} detail"), kw.pop("fix", f"fix {name}"), **kw)


def test_containers_fail_naming_the_dead_and_stale_ones():
    from fused.container_files import DEAD, GONE, NOT_TETHERS, OK, STALE

    one = doctor.containers_result([finding("db", OK), finding("web", DEAD), finding("old", GONE)], "the daemon's list")
    assert (one.status, one.fix) == (FAIL, "fix web")
    assert one.detail == "1 running container(s) with dead served files: web (web: web detail)"
    many = doctor.containers_result([finding(f"c{i}", DEAD) for i in range(7)] + [finding("s", STALE),
                                    finding("n", NOT_TETHERS)], "x")
    assert many.status == FAIL
    assert many.detail.startswith("8 running container(s) with dead or stale served files: c0, c1, c2, c3, c4 and 3 more")
    assert many.fix == "restart each of them (`tether ps` prints the command for each); c0: fix c0"
    whole = doctor.containers_result([finding("a", DEAD, mount_dead=True), finding("b", DEAD, mount_dead=True)], "x")
    assert whole.fix.startswith("restart tether-fused first (the mount fails too: see the mount line), then restart each")


def test_containers_warn_on_an_etc_hosts_not_tethers_and_on_what_was_not_checked():
    from fused.container_files import NOT_TETHERS, OK, UNCHECKED

    r = doctor.containers_result([finding("db", OK), finding("pod", NOT_TETHERS, detail="/etc/hosts is the image's own file")], "x")
    assert r.status == WARN and r.detail == ("1 running container(s) without tether's /etc/hosts: pod "
                                             "(pod: /etc/hosts is the image's own file)") and r.fix == "fix pod"
    assert doctor.containers_result([finding("db", UNCHECKED)], "x").status == WARN


def test_containers_ok_and_none():
    from fused.container_files import GONE, OK

    r = doctor.containers_result([finding("db", OK), finding("web", OK)], "the daemon's list")
    assert r.status == OK and r.detail == ("2 running container(s) read what tether serves: /etc/hosts, "
                                           "/etc/tether/hosts, /etc/resolv.conf from inside each (the daemon's list)")
    assert doctor.containers_result([finding("old", GONE)], "the store").detail == "no running container to check (the store)"


def test_ps_warns_on_stderr_and_gives_each_container_its_served_files_state(tmp_path, monkeypatch, capsys):
    """The table (or JSON) still comes out on stdout; a warning line per
    container whose files are dead, stale or not tether's; at most ten."""
    from fused import container_files as cf
    from fused.container_files import DEAD, NOT_TETHERS, OK

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'run_dir = "{tmp_path}/run"\n')
    items = [{"name": n, "id": f"id-{n}", "state": "running" if n != "old" else "stopped", "ip": "10.0.0.2",
              "pid": 7 if n != "old" else None, "published": [], "links": [], "stopped_at": None}
             for n in ("db", "old", "pod", "web")]
    answers = {"health": {"files": "ok"}, "drift": [], "ps": items}
    monkeypatch.setattr(cli, "request", lambda sock, op, args, **kw: answers[op])
    checked = []

    def check(fs, running, served):
        checked.append([c.name for c in running])
        return [finding("db", OK), finding("pod", NOT_TETHERS), finding("web", DEAD, detail="/etc/hosts: dead")]

    monkeypatch.setattr(cf, "check", check)
    assert cli.run(["--config", str(cfg), "ps"]) == 0
    out, err = capsys.readouterr()
    assert checked == [["db", "pod", "web"]]  # the running ones
    assert [ln.split()[0] for ln in out.splitlines()] == ["NAME", "db", "pod", "web"]
    assert err.splitlines() == ["tether: warning: pod: served files not-tethers: pod detail: fix pod",
                                "tether: warning: web: served files dead: /etc/hosts: dead: fix web"]
    assert cli.run(["--config", str(cfg), "--json", "ps", "-a"]) == 0
    got = {c["name"]: c["served_files"] for c in json.loads(capsys.readouterr().out)}
    assert got == {"db": {"state": "ok", "detail": "db detail", "fix": "fix db"}, "old": None,
                   "pod": {"state": "not-tethers", "detail": "pod detail", "fix": "fix pod"},
                   "web": {"state": "dead", "detail": "/etc/hosts: dead", "fix": "fix web"}}
    monkeypatch.setattr(cf, "check", lambda fs, running, served: [finding(f"c{i}", DEAD) for i in range(12)])
    assert cli.run(["--config", str(cfg), "ps"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and err[-1] == "tether: warning: and 2 more container(s) like these: `tether doctor` counts them"
