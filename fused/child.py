"""A helper process that tether-fused starts, watches, and leaves running when
it stops, so that what it serves outlives tether-fused: the DNS responder
and the file server (fs/session.py adds the FUSE mount around it).

  - It is found again by <run_dir>/<name>.pid, checked against its command
    line: a stale pid file may name any process, which is never signalled.
  - It is spoken to over <run_dir>/<name>.sock (fused.channel's frames); it
    is up once it answers "hello" with its own pid.
  - It is started with the file descriptors it serves (inherited), in a
    session of its own, without systemd's variables (it is not the unit's
    main process).
  - It is watched through a pidfd (a signal or a wait never hits a reused
    pid), and started again when it dies.
  - One that runs other code is replaced only once this installation's is
    known to start (`python -m MODULE --check`).

Standard library only.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .channel import connect, recv_frame, send_frame

log = logging.getLogger("tether")

SPAWN_TIMEOUT = 10.0
WATCH_INTERVAL = 0.5


def log_format(env=os.environ) -> str:
    """journald stamps each line itself (JOURNAL_STREAM is set for a unit's
    stderr); anywhere else a line carries its own time."""
    if env.get("JOURNAL_STREAM"):
        return "%(name)s: %(message)s"
    return "%(asctime)s %(name)s: %(message)s"


def begin(parser, code_version: Callable[[], str], argv: list[str] | None = None):
    """The helper's first steps: with `--check`, print its code version and
    exit 0 (this installation's helper starts: see check_code); else its
    arguments, its log on stderr, and SIGINT and SIGHUP ignored (it outlives
    whoever started it)."""
    if argv is None and "--check" in sys.argv[1:]:
        print(code_version())
        sys.exit(0)
    a = parser.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format=log_format(), stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return a


class ChildError(Exception):
    """A helper process cannot be started; the message says why."""


def read_pid(path: Path) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running(run_dir: Path, name: str, module: str) -> int | None:
    """The pid in <run_dir>/<name>.pid if that process is `python -m module`
    for this run_dir."""
    pid = read_pid(Path(run_dir) / f"{name}.pid")
    if pid is None:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if module.encode() in argv and str(run_dir).encode() in argv else None


def announce(run_dir: str, name: str) -> None:
    """The helper's side: its pid file, written whole, once its channel listens."""
    path = os.path.join(run_dir, f"{name}.pid")
    with open(f"{path}.tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(f"{path}.tmp", path)


def terminate(pid: int, timeout: float = 2.0) -> None:
    """SIGTERM, and SIGKILL when it has not gone within `timeout`. Returns
    once it is out of the process table, or `timeout` after it exited: an
    orphan (a helper of an earlier tether-fused) is reaped by init in init's
    own time, and shows in /proc and ps until then. Not for our own children
    (they are reaped by our wait: Child.forget)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
        reaped_by = time.monotonic() + timeout
        while time.monotonic() < reaped_by:
            signal.pidfd_send_signal(pidfd, 0)  # ProcessLookupError once reaped
            time.sleep(0.005)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def check_code(module: str) -> str | None:
    """None when this installation's `module` starts (imports everything);
    else the last line of what it said."""
    check = subprocess.run([sys.executable, "-P", "-m", module, "--check"], cwd="/", capture_output=True,
                           text=True, timeout=30)
    if check.returncode == 0:
        return None
    return (check.stderr.strip().splitlines() or [f"exit {check.returncode}"])[-1]


class Child:
    """tether-fused's handle on one helper process: its channel and its pidfd."""

    def __init__(self, run_dir: Path, name: str, module: str, label: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.name = name  # its files: <name>.pid, <name>.sock
        self.label = label or f"{name} process"  # what the logs and errors call it
        self.module = module
        self.proc: subprocess.Popen | None = None  # when we started it (else adopted)
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.conn = None

    @property
    def sock_path(self) -> Path:
        return self.run_dir / f"{self.name}.sock"

    def adopt(self, pid: int, timeout: float = 5.0) -> dict:
        """Take on a running helper; returns its hello. OSError or ValueError:
        it does not answer as it should (it is then left alone)."""
        pidfd = os.pidfd_open(pid)
        conn = None
        try:
            conn = connect(str(self.sock_path), timeout)
            send_frame(conn, {"op": "hello"})
            hello, _ = recv_frame(conn)
            if not hello or hello.get("pid") != pid:
                raise ValueError(f"{self.sock_path} is not answered by pid {pid}")
        except BaseException:
            if conn is not None:
                conn.close()
            os.close(pidfd)
            raise
        self.pid, self.pidfd, self.conn = pid, pidfd, conn
        return hello

    def spawn(self, args: list[str], fds: list[int]) -> dict:
        """Start a helper serving `fds` and wait until it answers; returns its hello."""
        cmd = [sys.executable, "-P", "-m", self.module, "--run-dir", str(self.run_dir), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
        try:
            proc = subprocess.Popen(cmd, pass_fds=fds, start_new_session=True, stdin=subprocess.DEVNULL, env=env,
                                    cwd="/")
        except OSError as e:
            raise ChildError(f"cannot start the {self.label}: {e.strerror or e}") from None
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise ChildError(f"the {self.label} exited at once ({proc.returncode}): see the log above")
            conn = None
            try:
                conn = connect(str(self.sock_path), 2.0)
                send_frame(conn, {"op": "hello"})
                hello, _ = recv_frame(conn)
                if hello and hello.get("pid") == proc.pid:
                    break
            except (OSError, ValueError):
                pass
            if conn is not None:
                conn.close()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise ChildError(f"the {self.label} did not answer on {self.sock_path} within {SPAWN_TIMEOUT:g} s")
            time.sleep(0.005)
        self.proc, self.pid, self.pidfd, self.conn = proc, proc.pid, os.pidfd_open(proc.pid), conn
        return hello

    def call(self, msg: dict, timeout: float, fds: list[int] | None = None,
             with_fds: bool = False) -> tuple[dict, list[int]]:
        """One request and its answer; OSError or ValueError when there is none."""
        if self.conn is None:
            raise OSError(f"no {self.label}")
        self.conn.settimeout(timeout)
        send_frame(self.conn, msg, fds)
        reply, got = recv_frame(self.conn, with_fds=with_fds)
        if reply is None:
            raise OSError(f"the {self.label} closed its channel")
        return reply, got

    def kill(self) -> None:
        """It stopped answering: SIGKILL (the watcher starts another)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forget(self, timeout: float = 2.0) -> None:
        """Let go of it (dead, or being replaced): it is killed if it still
        runs, and gone when this returns (what it held, its sockets, with it)."""
        self.kill()
        if self.proc is not None:
            self.proc.wait()
            self.proc = None
        elif self.pidfd is not None:  # adopted: not ours to wait for, but its pidfd says when it ends
            select.select([self.pidfd], [], [], timeout)
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.pid = self.pidfd = None

    def release(self) -> None:
        """Stop speaking to it and leave it running (tether-fused stops; the next one takes it over)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def watch(self, restart: Callable[[], bool], stop: threading.Event,
              each_round: Callable[[], None] | None = None) -> None:
        """Until `stop`: when the helper dies (or there is none), call
        `restart`, which returns False to be called again a second later.
        `each_round` (about every WATCH_INTERVAL) watches what else the
        caller serves, on the same thread."""
        while not stop.is_set():
            try:
                pidfd = self.pidfd
                if pidfd is None:
                    gone = not stop.wait(WATCH_INTERVAL)
                else:
                    gone = bool(select.select([pidfd], [], [], WATCH_INTERVAL)[0]) or self.conn is None
                if gone and not stop.is_set() and not restart():
                    stop.wait(1.0)
                if each_round is not None and not stop.is_set():
                    each_round()
            except Exception:  # never leave it unwatched
                log.exception("watching the %s", self.label)
                stop.wait(1.0)
