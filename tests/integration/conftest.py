from __future__ import annotations

import os
import shutil

import pytest

from harness import Daemon, build_rootfs

MISSING = [t for t in ("runc", "busybox", "iptables-legacy", "ip") if not shutil.which(t)]


def pytest_collection_modifyitems(config, items):
    reason = None
    if os.geteuid() != 0:
        reason = "integration tests need root (netns, veth, iptables, FUSE, runc): run `make test` as root"
    elif MISSING:
        reason = f"integration tests need {', '.join(MISSING)}: run `make test`, which installs them"
    if reason:
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory):
    return build_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="module")
def daemon(rootfs):
    d = Daemon(rootfs)
    try:
        d.start()
        yield d
    finally:
        d.close()
