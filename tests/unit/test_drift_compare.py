"""fused.drift: the runtimes' lists against tether's records (pure parts)."""
from __future__ import annotations

import json

from fused import drift

RUNC = ("/usr/sbin/runc", "--root", "/run/runc")
OTHER = ("/usr/sbin/runc", "--root", "/tmp/t/runc")


def rec(name, state="running", cid=None, runtime=RUNC):
    return {"name": name, "id": cid or name, "state": state, "runtime": list(runtime)}


def seen(cid, status="running", **ann):
    return drift.Seen(cid, status, {k.replace("_", "."): v for k, v in ann.items()})


def test_runtime_command_reads_the_global_root():
    exe = "/usr/sbin/runc"
    assert drift.runtime_command(["runc", "create", "--bundle", "b", "x"], exe) == [exe, "--root", "/run/runc"]
    assert drift.runtime_command(["runc", "--root", "/x/y/", "create", "x"], exe) == [exe, "--root", "/x/y"]
    assert drift.runtime_command(["runc", "--log", "l", "--root=/r", "create"], exe) == [exe, "--root", "/r"]
    # a --root after the subcommand is not runc's global option
    assert drift.runtime_command(["runc", "create", "--root", "/no"], exe) == [exe, "--root", "/run/runc"]
    assert drift.runtime_command(["crun", "create"], "/usr/bin/crun") == ["/usr/bin/crun", "--root", "/run/crun"]
    assert drift.runtime_command(["bash"], "/usr/bin/bash") == []


def test_runtime_of_an_unknown_parent_is_unknown():
    assert drift.runtime_of(None) == drift.runtime_of(True) == drift.runtime_of(1) == []
    assert drift.runtime_of(2**31 - 1) == []  # no such process
    import os

    assert drift.runtime_of(os.getpid()) == []  # python is no runtime


def test_agreement_is_no_drift():
    assert drift.compare([rec("db"), rec("old", "stopped")], {RUNC: [seen("db")]}) == []


def test_running_in_runc_but_stopped_in_tether():
    (d,) = drift.compare([rec("db", "stopped")], {RUNC: [seen("db")]})
    assert (d.name, d.id) == ("db", "db")
    assert d.problem == "runc --root /run/runc has it running, tether has it stopped"
    assert "createRuntime hook did not run" in d.why and "tether doctor" in d.why
    assert d.line().startswith("db: runc --root /run/runc has it running")


def test_the_same_id_under_another_root_is_another_container():
    assert drift.compare([rec("db", "stopped", runtime=OTHER)], {RUNC: [seen("db")]}) == []
    # a record from before tether learnt runtimes ([]) matches any root
    assert len(drift.compare([rec("db", "stopped", runtime=())], {RUNC: [seen("db")]})) == 1


def test_never_registered_needs_tether_annotations_and_our_claim():
    listing = {RUNC: [seen("abc", io_tether_name="web"), seen("plain"), seen("theirs", io_tether_name="x")]}
    out = drift.compare([], listing, ours=lambda s: s.id != "theirs")
    assert [(d.name, d.id) for d in out] == [("web", "abc")]
    assert out[0].problem.endswith("tether never registered it")


def test_running_in_tether_but_gone_or_exited_in_runc():
    out = drift.compare([rec("gone"), rec("exited"), rec("elsewhere", runtime=OTHER)], {RUNC: [seen("exited", "stopped")]})
    assert [(d.name, d.problem) for d in out] == [
        ("gone", "tether has it running, runc --root /run/runc does not know it"),
        ("exited", "tether has it running, runc --root /run/runc has it stopped"),
    ]
    assert "poststop hook never arrived" in out[0].why
    assert "runc --root /run/runc delete exited" in out[1].why
    # a root that could not be listed says nothing about its containers
    assert drift.compare([rec("gone")], {}) == []


def test_stopped_in_runc_is_not_running():
    assert drift.compare([rec("db", "stopped")], {RUNC: [seen("db", "stopped")]}) == []


def test_parse_listing():
    assert drift.parse_listing("null") == []
    text = json.dumps([{"id": "db", "status": "running", "annotations": {"io.tether.name": "db"}, "bundle": "/b"}])
    assert drift.parse_listing(text) == [drift.Seen("db", "running", {"io.tether.name": "db"}, "/b")]


def hook_spec(*args):
    return {"hooks": {"createRuntime": [{"path": "/opt/tether/bin/tether-hook", "args": ["tether-hook", *args]}]}}


def test_claims_by_the_config_the_hook_names(tmp_path):
    mine, other = tmp_path / "a.toml", tmp_path / "b.toml"
    default = str(tmp_path / "default.toml")
    assert drift.claims({}, str(mine), default)  # no tether hook at all: ours to report
    assert drift.claims(hook_spec("--config", str(mine), "createRuntime"), str(mine), default)
    assert drift.claims(hook_spec(f"--config={mine}", "createRuntime"), str(mine), default)
    assert not drift.claims(hook_spec("--config", str(other), "createRuntime"), str(mine), default)
    assert drift.claims(hook_spec("createRuntime"), None, default)
    assert not drift.claims(hook_spec("createRuntime"), str(mine), default)


def test_an_id_runc_reused_is_judged_by_its_running_record():
    rows = [rec("alpha", cid="x"), rec("zeta", "stopped", cid="x")]
    assert drift.compare(rows, {RUNC: [seen("x")]}) == []


def test_records_that_changed_while_the_lists_were_read_are_left_out():
    rows = [dict(rec("db", "stopped"), changed=10.0), dict(rec("gone"), changed=20.0)]
    assert [d.name for d in drift.compare(rows, {RUNC: [seen("db")]}, since=15.0)] == ["db"]
    assert drift.compare(rows, {RUNC: [seen("db")]}, since=5.0) == []


def test_an_upgraded_runtime_and_crun_options_with_values():
    assert drift.runtime_command(["runc", "create"], "/usr/sbin/runc (deleted)") == ["/usr/sbin/runc", "--root", "/run/runc"]
    argv = ["crun", "--cgroup-manager", "systemd", "--log-level", "debug", "--root", "/x", "create"]
    assert drift.runtime_command(argv, "/usr/bin/crun") == ["/usr/bin/crun", "--root", "/x"]
