"""The file server's loop over a SOCK_SEQPACKET pair standing in for
/dev/fuse (one message per request, like the device): no root, no kernel."""
from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from fused.fs import handlers as h
from fused.fs import server, wire


def request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return wire.IN_HEADER.pack(wire.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0) + body


@pytest.fixture
def loop(tmp_path):
    kernel, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv = server.Server(str(tmp_path), dev.fileno(), fresh=False, passthrough=False)
    srv.apply({"op": "publish", "seq": 1, "full": True, "files": {"web": (b"10.0.0.2\tweb\n", b"", b"", b"")},
               "default": (b"", b"", b"", b""), "mtime_ns": 1})
    # a new server cannot know what the kernel caches: web's four files are invalidated
    for f in h.FILES:
        assert kernel.recv(4096) == wire.notify_inval_inode(h.ino("web", f))
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    kernel.settimeout(5)
    yield srv, kernel
    kernel.close()  # the device's end reads EOF: the loop ends
    t.join(5)
    assert not t.is_alive()
    dev.close()


def answer(kernel) -> tuple[int, int, bytes]:
    msg = kernel.recv(1 << 16)
    length, err, unique = wire.OUT_HEADER.unpack_from(msg)
    assert length == len(msg)
    return unique, err, msg[wire.OUT_HEADER.size:]


def test_a_server_taking_over_asks_the_kernel_to_resend(loop):
    _srv, kernel = loop
    assert kernel.recv(64) == wire.notify_resend()


def test_a_handler_that_raises_answers_eio_and_the_loop_goes_on(loop, monkeypatch):
    srv, kernel = loop
    kernel.recv(64)  # resend
    ino = h.ino("web", "hosts")

    def broken(req):
        raise RuntimeError("a bug")

    srv.handlers.dispatch[wire.GETATTR] = broken
    kernel.send(request(wire.GETATTR, 7, ino, b"\0" * 16))
    assert answer(kernel)[:2] == (7, -errno.EIO)
    # the next request is served as if nothing happened
    kernel.send(request(wire.OPEN, 9, ino, struct.pack("<II", 0, 0)))
    unique, err, body = answer(kernel)
    fh = wire.OPEN_OUT.unpack_from(body)[0]
    assert (unique, err) == (9, 0) and fh
    kernel.send(request(wire.READ, 11, ino, wire.READ_IN.pack(fh, 0, 4096, 0) + b"\0" * 16))
    assert answer(kernel) == (11, 0, b"10.0.0.2\tweb\n")


def test_garbage_from_the_device_is_skipped(loop):
    _srv, kernel = loop
    kernel.recv(64)
    kernel.send(b"\x01\x02\x03")  # shorter than a header: no reply, no crash
    kernel.send(request(wire.GETATTR, 13, h.ROOT, b"\0" * 16))
    assert answer(kernel)[:2] == (13, 0)


def test_incremental_publish_adds_changes_and_forgets(tmp_path):
    kernel, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        srv = server.Server(str(tmp_path), dev.fileno(), fresh=False, passthrough=False)
        web, db = (b"w\n", b"", b"", b""), (b"d\n", b"", b"", b"")
        srv.apply({"op": "publish", "seq": 1, "full": True, "files": {"web": web, "db": db},
                   "default": (b"", b"", b"", b"r\n"), "mtime_ns": 1})
        srv.apply({"op": "publish", "seq": 2, "full": False, "files": {"web": (b"w2\n", b"", b"", b""), "new": web},
                   "gone": ["db"], "default": (b"", b"", b"", b"r\n"), "mtime_ns": 2})
        snap = srv.handlers.snap
        assert snap.files == {"web": (b"w2\n", b"", b"", b""), "new": web}
        assert snap.by_key == {h.key("web"): "web", h.key("new"): "new"} == h.snapshot(snap.files).by_key
        assert srv.seq == 2
        # web's hosts changed, db went back to the default: both are invalidated
        kernel.setblocking(False)
        sent = []
        while True:
            try:
                sent.append(kernel.recv(64))
            except BlockingIOError:
                break
        assert wire.notify_inval_inode(h.ino("web", "hosts")) in sent
        assert wire.notify_inval_inode(h.ino("db", "hosts")) in sent
        assert wire.notify_inval_inode(h.ino("web", "env")) not in sent[-4:]
    finally:
        kernel.close()
        dev.close()


def test_log_lines_carry_a_time_unless_journald_stamps_them():
    import logging

    rec = logging.LogRecord("tether", logging.INFO, __file__, 1, "ready", None, None)
    plain = logging.Formatter(server.log_format({})).format(rec)
    journal = logging.Formatter(server.log_format({"JOURNAL_STREAM": "8:1234"})).format(rec)
    assert journal == "tether: ready"
    assert plain.endswith(" tether: ready") and plain[:4].isdigit()  # 2026-12-02 20:55:25,123 tether: ready
