"""Issue 11: state drift is visible. A container that runc runs while tether
has it stopped (its createRuntime hook did not run: a start without tether's
hooks, as a `podman start` that did not read them), or never registered, is
flagged by `tether ps` and `tether doctor`, with the reason."""
from __future__ import annotations

import json

import pytest

from harness import Daemon, serve


@pytest.fixture
def d(rootfs):
    d = Daemon(rootfs)
    try:
        d.start()
        yield d
    finally:
        d.close()


def without_hooks(bundle):
    path = bundle / "config.json"
    spec = json.loads(path.read_text())
    spec.pop("hooks")
    path.write_text(json.dumps(spec))


def warnings(d: Daemon, *args: str) -> list[str]:
    r = d.cli("ps", *args)
    return [ln for ln in r.stderr.splitlines() if ln.startswith("tether: warning: ")]


def test_ps_and_doctor_flag_what_runc_runs_and_tether_does_not(d):
    root = f"runc --root {d.runc_root}"
    b = d.start_container("db", None, "--expose", "5432")
    assert warnings(d) == []
    d.kill("db")
    assert d.cli_json("ps", "-a")[0]["state"] == "stopped"
    without_hooks(b)
    d.run("db", b)  # runc runs it; tether never heard of this start
    (w,) = warnings(d, "-a")
    assert w.startswith(f"tether: warning: db: {root} has it running, tether has it stopped: ")
    assert "createRuntime hook did not run" in w and "tether doctor" in w
    assert warnings(d, "--json") == [w]  # stderr: the JSON on stdout stays parseable
    json.loads(d.cli("--json", "ps").stdout)
    # a container with tether's annotations that tether never registered
    ghost = d.bundle("ghost", serve("ghost"))
    without_hooks(ghost)
    d.run("ghost", ghost)
    assert [w.split(":")[2].strip() for w in warnings(d)] == ["db", "ghost"]
    assert any(f"ghost: {root} has it running, tether never registered it" in w for w in warnings(d))
    doctor = d.cli("doctor", check=False).stdout
    (line,) = [ln for ln in doctor.splitlines() if ln.split()[1:2] == ["drift"]]
    assert line.startswith("warn") and "db:" in line and "and 1 more" in line
    # both stopped: nothing to flag
    d.kill("db")
    d.kill("ghost")
    assert warnings(d, "-a") == []
    assert [ln for ln in d.cli("doctor", check=False).stdout.splitlines() if " drift " in ln][0].startswith("ok")
