"""hooks.hook: the OCI hook (DESIGN "Hooks").

The hook reads the OCI state as bytes, checks only its size, and forwards it
unparsed (`state_json`) in one request line to tether-fused; the daemon
validates it (see test_hook_input.py). These tests run the hook against no
daemon, a stale socket, a fake daemon (a real AF_UNIX server thread) and the
real control server.
"""
from __future__ import annotations

import ast
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import tomllib
from pathlib import Path

import pytest

from fused import protocol
from fused.protocol import OK_PREFIX
from hooks import hook

ROOT = Path(__file__).parents[2]

STATE = {
    "ociVersion": "1.0.2",
    "id": "db",
    "status": "creating",
    "pid": 4242,
    "bundle": "/nonexistent/bundle",
    "annotations": {"io.tether.name": "db"},
}
OK_LINE = b'{"ok": true, "v": 1, "result": {"name": "db", "ip": "10.213.0.2"}}\n'


def stdin_of(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def state_bytes(**kw) -> bytes:
    s = dict(STATE)
    s.update(kw)
    return json.dumps(s).encode()


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert lines[0].startswith("tether-hook: ")
    return lines[0]


def decoded(line: bytes) -> dict:
    """A request line as the daemon sees it: one line of ASCII JSON."""
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line[:200]
    assert line.isascii()
    return json.loads(line)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("TETHER_CONFIG", raising=False)
    # never read the host's /etc/tether/tether.toml
    monkeypatch.setattr(hook, "DEFAULT_CONFIG", "/nonexistent/tether-test/tether.toml")


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

    monkeypatch.setattr(hook, "exchange", boom)


@pytest.fixture
def sent(monkeypatch):
    """Record what the hook sends; answer OK without a daemon."""
    calls: list[tuple[str, bytes, float]] = []

    def fake(sock_path, line, timeout=10.0):
        calls.append((sock_path, line, timeout))
        return OK_LINE

    monkeypatch.setattr(hook, "exchange", fake)
    return calls


class FakeDaemon:
    """A real Unix-socket server in a thread: reads one line per connection,
    records it, and answers with `answer` (bytes, sent in `chunks` pieces), or
    closes without answering (answer b""), or holds the connection open until
    `release` is set (answer None)."""

    def __init__(self, path: Path, answer: bytes | None, chunks: int = 1) -> None:
        self.path = str(path)
        self.answer = answer
        self.chunks = chunks
        self.lines: list[bytes] = []
        self.release = threading.Event()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                self.lines.append(buf)
                if self.answer is None:
                    self.release.wait(10)
                    continue
                step = max(1, -(-len(self.answer) // self.chunks))
                for i in range(0, len(self.answer), step):
                    conn.sendall(self.answer[i : i + step])
                    if self.chunks > 1:
                        self._stop.wait(0.01)

    def close(self) -> None:
        self.release.set()
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def daemon(run_dir):
    started: list[FakeDaemon] = []

    def start(answer: bytes | None, chunks: int = 1) -> FakeDaemon:
        d = FakeDaemon(run_dir / "fused.sock", answer, chunks)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


# --- bad arguments: no daemon contact ----------------------------------------


@pytest.mark.parametrize("stage", ["createruntime", "poststart", "start", "--bogus", "create\nRuntime", "", "x" * 500])
def test_unknown_stage(stage, capsys, no_daemon):
    rc = hook.run([stage], stdin_of(state_bytes()))
    assert rc == 1
    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert "unknown stage" in line
    for s in ("createRuntime", "prestart", "poststop"):
        assert s in line
    assert len(line) < 200  # a huge argument is cut


@pytest.mark.parametrize(
    "argv", [[], ["createRuntime", "poststop"], ["--config"], ["--config", "", "createRuntime"], ["--config="]]
)
def test_bad_arguments(argv, capsys, no_daemon):
    assert hook.run(argv, stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "usage: tether-hook" in line


def test_bad_stage_is_reported_before_stdin_is_read(capsys, no_daemon):
    class Unreadable(io.RawIOBase):
        def read(self, n=-1):
            raise AssertionError("stdin read for a bad stage")

    assert hook.run(["bogus"], Unreadable()) == 1
    assert "unknown stage" in one_line(capsys.readouterr().err)


def test_help_exits_zero(capsys, no_daemon):
    with pytest.raises(SystemExit) as ei:
        hook.run(["--help"], stdin_of(b""))
    assert ei.value.code == 0
    assert "usage: tether-hook" in capsys.readouterr().out


# --- stdin size --------------------------------------------------------------


class CountingStream(io.RawIOBase):
    """An endless stdin that counts what was read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n=-1):
        assert n is not None and n >= 0, "the hook must not read stdin unbounded"
        self.read_bytes += n
        return b"x" * n


@pytest.mark.parametrize("stage", ["createRuntime", "poststop"])
def test_oversized_state_is_refused_without_contacting_the_daemon(stage, capsys, no_daemon):
    big = b'{"id": "db", "pad": "' + b"x" * (1 << 20) + b'"}'
    assert len(big) > hook.MAX_STATE == 1 << 20
    assert hook.run([stage], stdin_of(big)) == 1
    line = one_line(capsys.readouterr().err)
    assert "larger than" in line and str(1 << 20) in line and "OCI runtime" in line


def test_one_byte_over_the_limit_is_refused(capsys, no_daemon):
    assert hook.run(["createRuntime"], stdin_of(b" " * (hook.MAX_STATE + 1))) == 1
    assert "larger than" in one_line(capsys.readouterr().err)


def test_endless_stdin_is_read_only_up_to_the_limit(capsys, no_daemon):
    stream = CountingStream()
    assert hook.run(["createRuntime"], stream) == 1
    assert stream.read_bytes == hook.MAX_STATE + 1
    assert "larger than" in one_line(capsys.readouterr().err)


def test_state_of_exactly_max_size_is_sent(cfg, sent):
    body = state_bytes()
    data = body + b" " * (hook.MAX_STATE - len(body))
    assert len(data) == hook.MAX_STATE
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)) == 0
    (_, line, _), = sent
    assert decoded(line)["args"]["state_json"] == data.decode()


# --- the request line --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        state_bytes(),
        # a pretty-printed state: newlines and indentation are forwarded as they are
        json.dumps(STATE, indent=2).encode() + b"\n",
        # non-ASCII, quotes, backslashes, control characters, U+2028
        json.dumps({**STATE, "x": "caf\u00e9 \u65e5\u672c \U0001f600 \"q\" \\ \t \u2028"}, ensure_ascii=False).encode(),
        # not JSON at all: the hook does not parse, the daemon refuses it
        b"{",
        b"",
        b"[1, 2]",
        b'"db"',
        b"null",
        b'{"id": "db"} trailing',
        b"\x00\x01\x7f",
    ],
    ids=["compact", "pretty", "non-ascii", "brace", "empty", "array", "string", "null", "trailing", "controls"],
)
def test_request_line_carries_the_raw_state_text(data, cfg, run_dir, sent):
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)) == 0
    (sock, line, timeout), = sent
    assert sock == str(run_dir / "fused.sock")
    assert timeout == hook.TIMEOUT == 10.0
    assert decoded(line) == {
        "v": 1,
        "op": "register",
        "args": {"stage": "createRuntime", "state_json": data.decode("utf-8"), "ppid": os.getppid()},
    }


def test_invalid_utf8_is_forwarded_with_replacement_characters(cfg, sent):
    data = b'{"id": "d\xffb\xc3"}'
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)) == 0
    state_json = decoded(sent[0][1])["args"]["state_json"]
    assert state_json == '{"id": "d\ufffdb\ufffd"}'


@pytest.mark.parametrize(
    "stage, op", [("createRuntime", "register"), ("prestart", "register"), ("poststop", "poststop")]
)
def test_stage_and_op(stage, op, cfg, sent):
    assert hook.run(["--config", str(cfg), stage], stdin_of(state_bytes())) == 0
    args = decoded(sent[0][1])
    assert (args["op"], args["args"]["stage"]) == (op, stage)


def test_config_flag_forms(cfg, run_dir, sent):
    assert hook.run([f"--config={cfg}", "poststop"], stdin_of(b"{}")) == 0
    assert hook.run(["poststop", "--config", str(cfg)], stdin_of(b"{}")) == 0
    assert [s for s, _, _ in sent] == [str(run_dir / "fused.sock")] * 2


@pytest.mark.parametrize(
    "state", ["", "{}", "\u00e9\n\"\\", "\x00\x1f\x7f", "\ud800", "a" * 70000, "\U0001f600\u2028\u2029"]
)
def test_request_line_is_the_json_of_the_request(state):
    line = hook.request_line("register", "createRuntime", state)
    assert line.isascii() and line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"v": 1, "op": "register", "args": {"stage": "createRuntime", "state_json": state}}
    # what the CLI's encoder would send, byte for byte
    assert line == json.dumps({"v": 1, "op": "register", "args": {"stage": "createRuntime", "state_json": state}}).encode() + b"\n"


# --- daemon down -------------------------------------------------------------


def test_create_runtime_with_daemon_down_fails_naming_socket_and_fix(cfg, run_dir, capsys):
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    out, err = capsys.readouterr()
    assert out == ""
    line = one_line(err)
    assert str(run_dir / "fused.sock") in line
    assert "not running" in line
    assert "systemctl start tether-fused" in line and "tether-fused --config" in line
    assert os.listdir(run_dir) == []  # nothing left behind


def test_prestart_behaves_like_create_runtime(cfg, run_dir, capsys):
    assert hook.run([f"--config={cfg}", "prestart"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert str(run_dir / "fused.sock") in line and "not running" in line


def test_poststop_with_daemon_down_succeeds_with_a_warning(cfg, run_dir, capsys):
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes(status="stopped"))) == 0
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tether-hook: warning: ")
    assert str(run_dir / "fused.sock") in line


def test_poststop_with_daemon_down_still_refuses_an_oversized_state(cfg, capsys):
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(b" " * (hook.MAX_STATE + 1))) == 1
    assert "larger than" in one_line(capsys.readouterr().err)


def test_stale_socket_file(cfg, run_dir, capsys):
    # a socket file nobody listens on (the daemon died)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "fused.sock"))
    s.close()
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "not listening" in line and str(run_dir / "fused.sock") in line
    assert "systemctl start tether-fused" in line
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 0
    assert "warning" in one_line(capsys.readouterr().err)


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    p = tmp_path / "t.toml"
    p.write_text(f'run_dir = "{f}"\n')
    assert hook.run(["--config", str(p), "createRuntime"], stdin_of(state_bytes())) == 1
    assert str(f / "fused.sock") in one_line(capsys.readouterr().err)


def test_env_config_is_used_without_flag(cfg, run_dir, capsys, monkeypatch):
    monkeypatch.setenv("TETHER_CONFIG", str(cfg))
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 1
    assert str(run_dir / "fused.sock") in one_line(capsys.readouterr().err)


def test_config_flag_wins_over_env(cfg, run_dir, tmp_path, monkeypatch, sent):
    other = tmp_path / "other.toml"
    other.write_text('run_dir = "/nonexistent/other"\n')
    monkeypatch.setenv("TETHER_CONFIG", str(other))
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 0
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 0
    assert [s for s, _, _ in sent] == [str(run_dir / "fused.sock"), "/nonexistent/other/fused.sock"]


def test_without_any_config_the_default_run_dir_is_used(sent):
    assert not os.path.exists(hook.DEFAULT_CONFIG)
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 0
    assert sent[0][0] == "/run/tether/fused.sock"


def test_the_default_config_file_is_read_when_present(cfg, run_dir, monkeypatch, sent):
    monkeypatch.setattr(hook, "DEFAULT_CONFIG", str(cfg))
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 0
    assert sent[0][0] == str(run_dir / "fused.sock")


def test_empty_env_config_means_unset(monkeypatch, sent):
    monkeypatch.setenv("TETHER_CONFIG", "")
    assert hook.run(["createRuntime"], stdin_of(state_bytes())) == 0
    assert sent[0][0] == "/run/tether/fused.sock"


# --- a fake daemon -----------------------------------------------------------


@pytest.mark.parametrize("stage", ["createRuntime", "prestart", "poststop"])
@pytest.mark.parametrize("chunks", [1, 7])
def test_fake_daemon_ok(stage, chunks, cfg, daemon, capsys):
    d = daemon(OK_LINE, chunks)
    data = json.dumps(STATE, indent=1, ensure_ascii=False).encode()
    assert hook.run(["--config", str(cfg), stage], stdin_of(data)) == 0
    assert capsys.readouterr() == ("", "")
    (line,) = d.lines
    req = decoded(line)
    assert req["args"] == {"stage": stage, "state_json": data.decode(), "ppid": os.getppid()}
    assert req["op"] == hook.STAGES[stage]


def test_fake_daemon_ok_with_a_null_result(cfg, daemon, capsys):
    daemon(b'{"ok": true, "v": 1, "result": null}\n')
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("stage", ["createRuntime", "prestart", "poststop"])
def test_fake_daemon_error_is_one_line_exit_1(stage, cfg, daemon, capsys):
    msg = "address pool exhausted: every address of 10.213.0.0/29 is held by a running container; stop one"
    daemon(json.dumps({"ok": False, "v": 1, "error": msg}).encode() + b"\n")
    # a daemon error on poststop is an error too (only "unreachable" is tolerated)
    assert hook.run(["--config", str(cfg), stage], stdin_of(state_bytes())) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == "tether-hook: " + msg


def test_fake_daemon_error_with_non_ascii_message(cfg, daemon, capsys):
    msg = "io.tether.name: '\u00e9t\u00e9' is not an RFC 1123 label"
    daemon(json.dumps({"ok": False, "v": 1, "error": msg}).encode() + b"\n")
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    assert one_line(capsys.readouterr().err) == "tether-hook: " + msg


def test_ok_false_answer_in_the_old_key_order_is_still_an_error(cfg, daemon, capsys):
    daemon(b'{"v": 1, "ok": false, "error": "boom"}\n')
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    assert one_line(capsys.readouterr().err) == "tether-hook: boom"


def test_ok_true_answer_in_the_old_key_order_is_decoded(cfg, daemon, capsys):
    # not the fast prefix, but decode() still sees success
    daemon(b'{"v": 1, "ok": true, "result": {}}\n')
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("answer", [b"garbage\n", b'{"ok": tru\n'])
def test_malformed_answer(answer, cfg, daemon, capsys):
    daemon(answer)
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    assert "malformed answer" in one_line(capsys.readouterr().err)


def test_daemon_closing_without_answer(cfg, run_dir, daemon, capsys):
    daemon(b"")
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "without answering" in line and str(run_dir / "fused.sock") in line
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 0
    assert "warning" in one_line(capsys.readouterr().err)


def test_a_silent_daemon_does_not_hang_the_hook(cfg, run_dir, daemon, capsys, monkeypatch):
    monkeypatch.setattr(hook, "TIMEOUT", 0.3)
    daemon(None)
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "did not answer within 0.3 s" in line and str(run_dir / "fused.sock") in line
    assert hook.run(["--config", str(cfg), "poststop"], stdin_of(state_bytes())) == 0
    assert "warning" in one_line(capsys.readouterr().err)


def test_socket_without_permission(cfg, capsys, monkeypatch):
    # root ignores a socket's mode: simulate the error the kernel gives others
    import _socket

    class Sock(_socket.socket):
        def connect(self, addr):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(protocol._socket, "socket", Sock)
    assert hook.run(["--config", str(cfg), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "permission denied" in line and "root" in line


# --- the real program --------------------------------------------------------


def run_program(args: list[str], data: bytes, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "TETHER_CONFIG"}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from hooks.hook import main; main()", *args],
        input=data,
        capture_output=True,
        cwd=ROOT,
        env=e,
        timeout=30,
    )


def test_program_reads_binary_stdin_and_exits_0(cfg, daemon):
    d = daemon(OK_LINE)
    data = json.dumps(STATE, ensure_ascii=False).encode() + "\u00e9".encode()
    p = run_program(["--config", str(cfg), "createRuntime"], data)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    assert decoded(d.lines[0])["args"]["state_json"] == data.decode()


def test_program_with_daemon_down(cfg, run_dir):
    p = run_program(["createRuntime"], state_bytes(), env={"TETHER_CONFIG": str(cfg)})
    assert p.returncode == 1 and p.stdout == b""
    assert str(run_dir / "fused.sock") in one_line(p.stderr.decode())
    p = run_program(["poststop"], state_bytes(), env={"TETHER_CONFIG": str(cfg)})
    assert p.returncode == 0
    assert "warning" in one_line(p.stderr.decode())


# --- the run_dir -------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def toml_run_dir(text: str) -> str:
    return tomllib.loads(text).get("run_dir", hook.DEFAULT_RUN_DIR)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('run_dir = "/x/y"\n', "/x/y"),
        ("run_dir = '/x/y'\n", "/x/y"),
        ('run_dir="/x/y"', "/x/y"),
        ('  run_dir\t=\t"/x/y"  \n', "/x/y"),
        ('run_dir = "/x/y"  # where fused.sock lives\n', "/x/y"),
        ('run_dir = "/x/y"# no space\n', "/x/y"),
        ('run_dir = "/x#y"\n', "/x#y"),
        ("run_dir = '/x\"y'\n", '/x"y'),
        ('run_dir = "/x/\u00e9"\n', "/x/\u00e9"),
        ('run_dir = "/x/y"\r\n', "/x/y"),
        ('# tether\n\nstate_dir = "/s"\nrun_dir = "/r"\n[network]\nbridge = "b"\n', "/r"),
        # no run_dir anywhere
        ("", hook.DEFAULT_RUN_DIR),
        ('state_dir = "/s"\n', hook.DEFAULT_RUN_DIR),
        ('[network]\nbridge = "b"\n', hook.DEFAULT_RUN_DIR),
    ],
)
def test_simple_run_dir(text, expected):
    assert hook._simple_run_dir(text) == expected
    assert toml_run_dir(text) == expected  # the fast path agrees with TOML


@pytest.mark.parametrize(
    "text",
    [
        'run_dir = "/x\\\\y"\n',  # an escape: only TOML knows
        'run_dir = "/x\\"y"\n',
        "run_dir = 'C:\\x'\n",  # a literal string with a backslash
        'run_dir = """/x"""\n',
        "run_dir = '''/x'''\n",
        '"run_dir" = "/q"\n',  # a quoted key
        'run_directory = "/q"\nrun_dir = "/r"\n',
        '# run_dir was /old\nstate_dir = "/s"\n',  # mentioned, but not set
        '[network]\nrun_dir = "/x"\n',  # not top level
        'run_dir = "/x" "y"\n',
        "run_dir = \n",
        "run_dir = 5\n",
        'run_dir = "/x\n',
    ],
)
def test_simple_run_dir_leaves_anything_else_to_toml(text):
    assert hook._simple_run_dir(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ('run_dir = "/x\\\\y"\n', "/x\\y"),
        ('run_dir = "/x\\"y"\n', '/x"y'),
        ('run_dir = "/\\u00e9"\n', "/\u00e9"),
        ("run_dir = 'C:\\x'\n", "C:\\x"),
        ('run_dir = """/x"""\n', "/x"),
        ('run_dir = """\n/x"""\n', "/x"),  # a newline right after """ is trimmed
        ("run_dir = '''/x'''\n", "/x"),
        ('"run_dir" = "/q"\n', "/q"),
        ('run_directory = "/q"\nrun_dir = "/r"\n', "/r"),
        ('# run_dir was /old\nstate_dir = "/s"\n', hook.DEFAULT_RUN_DIR),
        ('[network]\nrun_dir = "/x"\n', hook.DEFAULT_RUN_DIR),
        ('[dns]\nenabled = true\n[network]\nrun_dir = "/x"\n', hook.DEFAULT_RUN_DIR),
    ],
)
def test_run_dir_falls_back_to_toml(tmp_path, text, expected):
    assert toml_run_dir(text) == expected
    assert hook.run_dir(write(tmp_path, text)) == expected


@pytest.mark.parametrize("text", ['run_dir = "/x" "y"\n', "run_dir = \n", 'run_dir = "/x\n', "run_dir = '/x\n\n"])
def test_invalid_toml_is_an_error(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(hook.HookError) as ei:
        hook.run_dir(p)
    assert "not valid TOML" in str(ei.value) and p in str(ei.value)


@pytest.mark.parametrize("text", ["run_dir = 5\n", "run_dir = []\n", 'run_dir.x = "/q"\n', "[run_dir]\n"])
def test_run_dir_must_be_a_string(tmp_path, text):
    with pytest.raises(hook.HookError, match="run_dir must be a string"):
        hook.run_dir(write(tmp_path, text))


@pytest.mark.parametrize("q", ['"""', "'''"])
def test_run_dir_line_inside_a_multiline_string_is_not_the_run_dir(tmp_path, q):
    text = f'motd = {q}\nrun_dir = "/elsewhere"\n{q}\n'
    assert toml_run_dir(text) == hook.DEFAULT_RUN_DIR
    assert hook.run_dir(write(tmp_path, text)) == hook.DEFAULT_RUN_DIR


def test_unreadable_config(tmp_path, capsys, no_daemon):
    assert hook.run(["--config", str(tmp_path / "nope.toml"), "createRuntime"], stdin_of(state_bytes())) == 1
    line = one_line(capsys.readouterr().err)
    assert "cannot read config" in line and "nope.toml" in line and "--config" in line


def test_config_that_is_not_utf8(tmp_path, capsys, no_daemon):
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'run_dir = "/caf\xe9"\n')
    assert hook.run(["--config", str(p), "createRuntime"], stdin_of(state_bytes())) == 1
    assert "cannot read config" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("stage", ["createRuntime", "poststop"])
def test_invalid_toml_config(tmp_path, capsys, no_daemon, stage):
    p = tmp_path / "bad.toml"
    p.write_text("run_dir = \n")
    assert hook.run(["--config", str(p), stage], stdin_of(state_bytes())) == 1
    assert "not valid TOML" in one_line(capsys.readouterr().err)


# --- the daemon's side of the contract ---------------------------------------


@pytest.mark.parametrize("result", [None, {}, {"name": "db"}, [1, 2], "x", {"known": False}])
def test_control_server_success_answers_start_with_the_ok_prefix(result):
    line = protocol.result_line(result)
    assert line.startswith(OK_PREFIX)
    assert protocol.decode(line) == result
    err = protocol.error_line("boom")
    assert not err.startswith(OK_PREFIX)
    with pytest.raises(protocol.DaemonError, match="^boom$"):
        protocol.decode(err)


def test_the_answer_lines_bytes():
    # what every client of every version relies on
    assert protocol.result_line({"name": "db"}) == b'{"ok": true, "v": 1, "result": {"name": "db"}}\n'
    assert protocol.error_line("bad\nname") == b'{"ok": false, "v": 1, "error": "bad\\nname"}\n'


@pytest.mark.parametrize("state", ["{}", json.dumps(STATE), 'x"\\\n\x00\u00e9\U0001f600'])
@pytest.mark.parametrize("ppid", [None, 1, 4242])
def test_the_hooks_request_line_is_the_protocols_request_line(state, ppid):
    # the hook builds its line without json; it must be the bytes the protocol's encoder makes
    args = {"stage": "createRuntime", "state_json": state, **({"ppid": ppid} if ppid is not None else {})}
    assert hook.request_line("register", "createRuntime", state, ppid) == protocol.request_line("register", args)


def test_a_request_line_parses_back_on_the_daemons_side():
    from fused.control import parse_request

    assert parse_request(protocol.request_line("ps")) == ("ps", {})
    assert parse_request(hook.request_line("poststop", "poststop", "{}", 7)) == (
        "poststop",
        {"stage": "poststop", "state_json": "{}", "ppid": 7},
    )


def with_control_server(run_dir: Path, dispatch, fn):
    """Run fn() in a thread while the real control server listens in run_dir."""
    import trio

    from fused import control

    async def main():
        async with trio.open_nursery() as n:
            await n.start(control.serve, run_dir / "fused.sock", dispatch)
            result = await trio.to_thread.run_sync(fn)
            n.cancel_scope.cancel()
        return result

    return trio.run(main)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the control socket answers root only")


@needs_root
def test_hook_against_the_real_control_server(cfg, run_dir, tmp_path, capsys):
    from fused.service import hook_input

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {"io.tether.name": "web"}}))
    seen = []

    async def dispatch(op, args):
        state, ann, _ = hook_input(args)
        seen.append((op, args["stage"], state, ann))
        return {"name": ann["io.tether.name"]}

    data = json.dumps({**STATE, "bundle": str(bundle), "annotations": {}}, indent=2).encode()
    rc = with_control_server(run_dir, dispatch, lambda: hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)))
    assert rc == 0
    assert capsys.readouterr().err == ""
    assert seen == [("register", "createRuntime", json.loads(data), {"io.tether.name": "web"})]


@needs_root
@pytest.mark.parametrize("data, words", [(b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"", "not valid JSON")])
def test_malformed_state_is_refused_by_the_daemon(cfg, run_dir, capsys, data, words):
    from fused.service import hook_input

    async def dispatch(op, args):
        hook_input(args)
        raise AssertionError("accepted")

    rc = with_control_server(run_dir, dispatch, lambda: hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)))
    assert rc == 1
    line = one_line(capsys.readouterr().err)
    assert words in line and "OCI runtime" in line


def test_a_state_the_hook_accepts_fits_in_a_request_line():
    body = state_bytes()
    data = body + b" " * (hook.MAX_STATE - len(body))
    line = hook.request_line("register", "createRuntime", data.decode())
    assert len(line) - 1 <= protocol.MAX_LINE


@needs_root
def test_a_state_of_max_size_reaches_the_real_daemon(cfg, run_dir, capsys):
    from fused.service import hook_input

    async def dispatch(op, args):
        hook_input(args)
        return {}

    body = state_bytes()
    data = body + b" " * (hook.MAX_STATE - len(body))
    rc = with_control_server(run_dir, dispatch, lambda: hook.run(["--config", str(cfg), "createRuntime"], stdin_of(data)))
    assert rc == 0, capsys.readouterr().err


# --- imports -----------------------------------------------------------------

HEAVY = ("pydantic", "trio", "pyroute2", "iptc", "pyfuse3", "sqlite3")
SLOW = ("json", "re", "enum", "socket", "tomllib")
# of fused/, the hook imports the control protocol it shares with the daemon, and nothing else
FUSED_OK = ("fused", "fused.protocol")


def modules_after(code: str) -> tuple[object, list[str]]:
    """Run `code` (which sets `rc`) in a fresh interpreter; return rc and the
    watched modules loaded (top-level names; of fused/, every module but FUSED_OK)."""
    watch = HEAVY + SLOW
    prog = (
        "import sys\n"
        f"{code}\n"
        f"fused = {{m for m in sys.modules if m.split('.')[0] == 'fused'}} - set({FUSED_OK!r})\n"
        f"print(repr((rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({watch!r}) | fused))))\n"
    )
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stderr
    return ast.literal_eval(p.stdout.strip().splitlines()[-1])


def test_hook_imports_only_the_cheap_standard_library():
    assert modules_after("import hooks.hook; rc = None") == (None, [])


def test_a_whole_hook_run_on_the_hot_path_imports_nothing_slow(cfg, daemon):
    daemon(OK_LINE)
    code = (
        "import io, hooks.hook\n"
        f"rc = hooks.hook.run(['--config', {str(cfg)!r}, 'createRuntime'], io.BytesIO({state_bytes()!r}))"
    )
    assert modules_after(code) == (0, [])


def test_a_failing_hook_run_imports_nothing_slow_either(cfg):
    code = (
        "import io, hooks.hook\n"
        f"rc = hooks.hook.run(['--config', {str(cfg)!r}, 'createRuntime'], io.BytesIO(b'{{}}'))"
    )
    assert modules_after(code) == (1, [])


def test_the_import_checker_sees_what_is_imported(tmp_path):
    # the checks above must be able to fail: the TOML fallback loads tomllib
    p = write(tmp_path, 'run_dir = """/x"""\n')
    rc, mods = modules_after(f"import hooks.hook; rc = hooks.hook.run_dir({p!r})")
    assert rc == "/x"
    assert "tomllib" in mods
    assert not [m for m in mods if m.startswith("fused")]


def test_the_import_checker_sees_more_of_fused_than_the_protocol():
    assert modules_after("import hooks.hook, fused.errors; rc = None") == (None, ["fused.errors"])
