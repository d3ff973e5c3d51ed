"""What tether-fused publishes to the DNS process, and what the process makes
of it (fused/dns/server.py encode/decode): each publish carries only what
changed, and the process ends up with exactly the DnsData a full render
gives (the oracle). Also: the process's code version covers every module it
runs."""
from __future__ import annotations

import json
import marshal
import subprocess
import sys
from pathlib import Path

from fused import graph, render
from fused.dns.server import CODE, decode, encode
from fused.graph import Node, Topology
from fused.model import PortSpec

ROOT = Path(__file__).parents[2]
PG = (PortSpec(5432, "tcp"),)

STEPS = [
    # (nodes, links): one change after another, as a daemon would see them
    ({"web": Node("web", "10.0.0.2", True), "db": Node("db", "10.0.0.3", True, PG)}, []),
    ({"web": Node("web", "10.0.0.2", True), "db": Node("db", "10.0.0.3", True, PG)},
     [("web", "database", "db", "10.1.0.1", "db")]),  # a link
    ({"web": Node("web", "10.0.0.2", True), "db": Node("db", "10.0.0.3", True, PG),
      "db2": Node("db2", "10.0.0.4", True, PG + (PortSpec(53, "udp"),))},
     [("web", "database", "db", "10.1.0.1", "db")]),  # a registration
    ({"web": Node("web", "10.0.0.2", True), "db": Node("db", "10.0.0.3", True, PG),
      "db2": Node("db2", "10.0.0.4", True, PG + (PortSpec(53, "udp"),))},
     [("web", "database", "db2", "10.1.0.1", "db2")]),  # a retarget
    ({"web": Node("web", "10.0.0.2", True), "db2": Node("db2", "10.0.0.4", True, PG)},
     [("web", "database", "db2", "10.1.0.1", "db2")]),  # db removed, db2's ports changed
    ({"web": Node("web", "10.0.0.5", True), "db2": Node("db2", "10.0.0.4", True, PG)},
     [("web", "database", "db2", "10.1.0.1", "db2")]),  # web at another address (evicted, back)
    ({"web": Node("web", "10.0.0.5", True), "db2": Node("db2", "10.0.0.4", True, PG)},
     [("web", "database", "db2", "10.1.0.1", "db2")]),  # nothing
]


def same(a: render.DnsData, b: render.DnsData) -> bool:
    return (a.names, a.links, a.hosts, a.ptr) == (b.names, b.links, b.hosts, b.ptr)


def test_each_publish_carries_the_change_and_the_process_ends_with_the_full_render():
    sent, in_process = None, render.DnsData({}, {}, None, {})
    prev, prev_views = None, {}
    sizes = []
    for nodes, links in STEPS:
        topo = Topology.of(nodes, links, "facade")
        views = graph.views(topo)
        if prev is None:
            data = render.dns_data(topo, views)
        else:  # as service.py does: recomputed only for the names whose views differ
            touched = {n for n in set(views) | set(prev_views) if views.get(n) != prev_views.get(n)}
            data = render.update_dns(prev, prev_views, views, touched)
        msg = encode(sent, data)
        wire = marshal.dumps(msg)  # what the channel carries
        sizes.append(len(wire))
        in_process = decode(in_process, marshal.loads(wire))
        assert same(in_process, render.dns_data(topo)), (nodes, links)
        sent, prev, prev_views = data, data, views
    assert sizes[-1] < sizes[0] and sizes[-1] < 120  # the last step changed nothing: an empty publish


def test_a_full_publish_replaces_everything_the_process_had():
    stale = decode(render.DnsData({}, {}, None, {}), encode(None, render.dns_data(Topology.of(*STEPS[3], "facade"))))
    fresh = render.dns_data(Topology.of(*STEPS[0], "facade"))
    assert same(decode(stale, encode(None, fresh)), fresh)


def loaded_but_not_in(code: tuple[str, ...]) -> list[str]:
    """The fused/ files a fresh DNS process imports that `code` does not name."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, json; import fused.dns.server; "
         "print(json.dumps([m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'fused']))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    files = {str(Path(f).relative_to(ROOT / "fused")) for f in json.loads(out.stdout)}
    return sorted(files - set(code) - {"__init__.py"})


def test_the_code_version_covers_every_module_the_process_runs():
    # an upgrade that changes any of them replaces the running DNS process
    assert loaded_but_not_in(CODE) == []


def test_the_code_check_can_fail():
    assert loaded_but_not_in(tuple(c for c in CODE if c != "dns/budget.py")) == ["dns/budget.py"]


def test_the_process_imports_no_trio_pydantic_store_or_kernel_library():
    # it starts in a fraction of a second (a restart's gap) and has little that can fail
    out = subprocess.run(
        [sys.executable, "-c", "import sys, json; import fused.dns.server; print(json.dumps(sorted("
         "{n.split('.')[0] for n in sys.modules} & {'trio', 'pydantic', 'sqlite3', 'pyroute2', 'iptc', 'pyfuse3'})))"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    assert json.loads(out.stdout) == []
