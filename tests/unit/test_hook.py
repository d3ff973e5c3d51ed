"""hooks.hook: the OCI hook, without a daemon (DESIGN "Hooks")."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hooks import hook
from hooks.protocol import DaemonError

STATE = {
    "ociVersion": "1.0.2",
    "id": "db",
    "status": "creating",
    "pid": 4242,
    "bundle": "/nonexistent/bundle",
    "annotations": {"io.tether.name": "db"},
}


def stdin_of(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data))


def state_bytes(**kw) -> bytes:
    s = dict(STATE)
    s.update(kw)
    return json.dumps(s).encode()


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tether-hook: ")
    return lines[0]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("TETHER_CONFIG", raising=False)


@pytest.fixture
def run_dir():
    # short path: AF_UNIX socket paths are limited to 107 bytes
    d = tempfile.mkdtemp(prefix="thk-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cfg(run_dir, tmp_path):
    p = tmp_path / "tether.toml"
    p.write_text(f'run_dir = "{run_dir}"\n')
    return p


@pytest.fixture
def no_daemon(monkeypatch):
    """Fail the test if the hook tries to reach a daemon."""

    def boom(*a, **k):
        raise AssertionError("the hook talked to the daemon")

    monkeypatch.setattr(hook, "request", boom)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize("stage", ["createruntime", "poststart", "start", "--bogus", "create\nRuntime", ""])
def test_unknown_stage(stage, capsys, no_daemon):
    rc = hook.run([stage], stdin_of(state_bytes()))
    assert rc == 1
    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert "unknown stage" in line
    for s in ("createRuntime", "prestart", "poststop"):
        assert s in line


@pytest.mark.parametrize("argv", [[], ["createRuntime", "poststop"], ["--config"]])
def test_bad_argument_count(argv, capsys, no_daemon):
    assert hook.run(argv, stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "usage: tether-hook" in line


@pytest.mark.parametrize(
    "data, words",
    [
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"db"', "JSON object"),
        (b"null", "JSON object"),
    ],
)
@pytest.mark.parametrize("stage", ["createRuntime", "poststop"])
def test_malformed_state(data, words, stage, capsys, no_daemon):
    assert hook.run([stage], stdin_of(data)) == 1
    line = one_line(capsys.readouterr().err)
    assert words in line
    assert "OCI runtime" in line


def test_oversized_state(capsys, no_daemon):
    big = b'{"id": "db", "pad": "' + b"x" * (1 << 20) + b'"}'
    assert len(big) > hook.MAX_STATE == 1 << 20
    assert hook.run(["createRuntime"], stdin_of(big)) == 1
    line = one_line(capsys.readouterr().err)
    assert "larger than" in line and str(1 << 20) in line


def test_state_of_exactly_max_size_is_read(monkeypatch, cfg):
    seen = {}
    monkeypatch.setattr(hook, "request", lambda sock, op, args, timeout: seen.update(args=args))
    body = state_bytes()
    data = body + b" " * (hook.MAX_STATE - len(body))
    assert len(data) == hook.MAX_STATE
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)) == 0
    assert seen["args"]["state"]["id"] == "db"


def test_unreadable_config(tmp_path, capsys, no_daemon):
    assert hook.run(["--config", str(tmp_path / "nope.toml"), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot read config" in line and "nope.toml" in line


def test_invalid_toml_config(tmp_path, capsys, no_daemon):
    p = tmp_path / "bad.toml"
    p.write_text("run_dir = \n")
    assert hook.run(["--config", str(p), "poststop"], stdin_of(state_bytes())) == 1
    assert "not valid TOML" in one_line(capsys.readouterr().err)


# --- daemon down -------------------------------------------------------------


def test_create_runtime_with_daemon_down_fails_naming_socket_and_fix(cfg, run_dir, capsys):
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert str(run_dir / "fused.sock") in line
    assert "not running" in line
    assert "systemctl start tether-fused" in line or "tether-fused --config" in line
    assert os.listdir(run_dir) == []  # nothing left behind


def test_prestart_behaves_like_create_runtime(cfg, run_dir, capsys):
    assert hook.run([f"--config={cfg}", "prestart"], stdin_of(state_bytes())) == 1
    assert str(run_dir / "fused.sock") in one_line(capsys.readouterr().err)


def test_poststop_with_daemon_down_succeeds_with_a_warning(cfg, run_dir, capsys):
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes(status="stopped"))) == 0
    line = one_line(capsys.readouterr().err)
    assert "warning" in line
    assert str(run_dir / "fused.sock") in line


def test_stale_socket_file(cfg, run_dir, capsys):
    # a socket file nobody listens on (the daemon died)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "fused.sock"))
    s.close()
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "not listening" in line and str(run_dir / "fused.sock") in line
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 0
    assert "warning" in capsys.readouterr().err


def test_env_config_is_used_without_flag(cfg, run_dir, capsys, monkeypatch):
    monkeypatch.setenv("TETHER_CONFIG", str(cfg))
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 1
    assert str(run_dir / "fused.sock") in one_line(capsys.readouterr().err)


# --- what reaches the daemon -------------------------------------------------


def test_request_carries_stage_state_and_annotations(cfg, run_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(hook, "request", lambda sock, op, args, timeout: calls.append((sock, op, args, timeout)))
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 0
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 0
    (s1, op1, a1, t1), (s2, op2, a2, t2) = calls
    assert s1 == s2 == str(run_dir / "fused.sock")
    assert (op1, op2) == ("register", "poststop")
    assert a1["stage"] == "createRuntime" and a2["stage"] == "poststop"
    assert a1["state"] == STATE
    assert a1["annotations"] == {"io.tether.name": "db"}
    assert t1 == t2 == 10.0


def test_annotations_are_read_from_the_bundle_when_state_has_none(cfg, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.tether.name": "web", "x": "y"}}))
    calls = []
    monkeypatch.setattr(hook, "request", lambda sock, op, args, timeout: calls.append(args))
    data = state_bytes(bundle=str(bundle), annotations=None)
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)) == 0
    assert calls[0]["annotations"] == {"io.tether.name": "web", "x": "y"}


def test_relative_or_broken_bundle_is_ignored(cfg, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hook, "request", lambda sock, op, args, timeout: calls.append(args))
    (tmp_path / "config.json").write_text("{broken")
    for bundle in ("relative/path", str(tmp_path), 5):
        assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes(bundle=bundle, annotations={}))) == 0
    assert [c["annotations"] for c in calls] == [{}, {}, {}]


def test_daemon_error_is_one_line_exit_1(cfg, monkeypatch, capsys):
    def refuse(sock, op, args, timeout):
        raise DaemonError("io.tether.links: invalid link alias 'X': use an RFC 1123 label")

    monkeypatch.setattr(hook, "request", refuse)
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    assert one_line(capsys.readouterr().err) == (
        "tether-hook: io.tether.links: invalid link alias 'X': use an RFC 1123 label"
    )
    # a daemon error on poststop is an error too (only "unreachable" is tolerated)
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 1


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as ei:
        hook.run(["--help"], stdin_of(b""))
    assert ei.value.code == 0
    assert "usage: tether-hook" in capsys.readouterr().out


# --- imports -----------------------------------------------------------------


def test_hook_imports_only_the_standard_library():
    code = (
        "import sys, hooks.hook; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('pydantic','trio','pyroute2','iptc','pyfuse3','fused')]; "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    ).stdout
    assert out.strip() == "[]"
