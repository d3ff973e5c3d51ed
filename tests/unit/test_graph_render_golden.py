"""Golden files for `graph.views` and `render`: the bytes every container is
served, and the views they come from, over a few topologies.

The expected outputs are plain files under golden/<case>/: `views` (what
`graph.views` resolves, one line per container and link) and
<container>/{hosts,ports,env,resolv.conf} byte for byte, `_unregistered/`
being what any other valid name is served. After a deliberate change:

    TETHER_GOLDEN_UPDATE=1 .venv/bin/pytest tests/unit/test_graph_render_golden.py

and review the diff of tests/unit/golden/ before committing it.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import NamedTuple

import pytest

from fused import graph, render
from fused.graph import Node, Topology
from fused.model import PortSpec

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TETHER_GOLDEN_UPDATE") == "1"
OTHER = "_unregistered"  # not a valid label: never a container's name

GATEWAY = "10.213.0.1"
PG = (PortSpec(5432, "tcp"), PortSpec(5433, "tcp"))


class Case(NamedTuple):
    topo: Topology
    dns_enabled: bool = True
    search: tuple[str, ...] = ()


def _nodes(*nodes: Node) -> dict[str, Node]:
    return {n.name: n for n in nodes}


WEB = Node("web", "10.213.0.2", True)
DB = Node("db", "10.213.0.3", True, PG)
DB2 = Node("db2", "10.213.0.4", True, PG)
# a name server: tcp and udp on the same port, and one of its own
NS = Node("ns", "10.213.0.5", True, (PortSpec(53, "tcp"), PortSpec(53, "udp"), PortSpec(8053, "udp")))
CACHE = Node("cache", "10.213.0.6", True, (PortSpec(6379, "tcp"),))

# web's links, given out of alias order: files list them sorted by alias
WEB_LINKS = (
    ("web", "resolver", "ns", "10.214.0.3", "ns"),
    ("web", "database", "db", "10.214.0.1", "db"),
    ("web", "cache", "cache", "10.214.0.2", "cache"),  # alias == target name
    ("web", "db-replica", "db", "10.214.0.4", "db"),  # a second alias, '-' in env
)


def _direct(links: tuple[tuple, ...]) -> tuple[tuple, ...]:
    return tuple((c, a, t) for c, a, t, *_ in links)


CASES: dict[str, Case] = {
    "facade": Case(Topology.of(_nodes(WEB, DB, NS, CACHE), WEB_LINKS, "facade")),
    "direct": Case(Topology.of(_nodes(WEB, DB, NS, CACHE), _direct(WEB_LINKS), "direct"), search=("corp.example",)),
    # after `tether move db db2`: same facades, new target name on the lines
    "facade-moved": Case(
        Topology.of(_nodes(WEB, DB, DB2, NS, CACHE), tuple((c, a, "db2" if t == "db" else t, f, g) for c, a, t, f, g in WEB_LINKS), "facade")
    ),
    # a link to a name that never registered (or was removed): no line anywhere
    "dangling": Case(
        Topology.of(
            _nodes(WEB, DB),
            (("web", "ghost", "gone", "10.214.0.7", "gone"), ("web", "db", "db", "10.214.0.1", "db")),
            "facade",
        )
    ),
    # a stopped target keeps its address: its lines stay, in both strategies
    "stopped-facade": Case(
        Topology.of(_nodes(WEB, DB._replace(running=False)), (("web", "database", "db", "10.214.0.1", "db"),), "facade")
    ),
    "stopped-direct": Case(
        Topology.of(_nodes(WEB, DB._replace(running=False)), (("web", "database", "db"),), "direct"),
        dns_enabled=False,
    ),
    # an evicted target has no address: its links dangle; an evicted consumer
    # has no own line but still sees its links
    "evicted": Case(
        Topology.of(
            _nodes(WEB, DB._replace(ip=None, running=False), Node("old", None, False), CACHE),
            (
                ("web", "database", "db", "10.214.0.1", "db"),
                ("web", "cache", "cache", "10.214.0.2", "cache"),
                ("old", "cache", "cache", "10.214.0.5", "cache"),
            ),
            "facade",
        )
    ),
    "evicted-direct": Case(
        Topology.of(
            _nodes(WEB, DB._replace(ip=None, running=False), CACHE),
            (("web", "database", "db"), ("web", "cache", "cache")),
            "direct",
        )
    ),
}


def views_text(topo: Topology) -> str:
    lines = []
    for name, v in sorted(graph.views(topo).items()):
        lines.append(f"{v.name} ip={v.ip}\n")
        for link in v.links:
            ports = ",".join(str(p) for p in link.ports) or "-"
            lines.append(f"  {link.alias} -> {link.target} address={link.address} state={link.state} ports={ports}\n")
    return "".join(lines)


def rendered(case: Case) -> dict[str, bytes]:
    """Relative path under golden/<case>/ -> expected bytes."""
    files, default = render.render_all(case.topo, GATEWAY, case.dns_enabled, case.search)
    out = {"views": views_text(case.topo).encode()}
    for name, fs in [*sorted(files.items()), (OTHER, default)]:
        for f in render.FILES:
            out[f"{name}/{f}"] = fs.get(f)
    return out


def _visible(data: bytes) -> list[str]:
    # tabs, trailing spaces and a missing last newline show in the diff
    return [repr(line)[2:-1] + "\n" for line in data.splitlines(keepends=True)]


def compare(case_dir: Path, want: dict[str, bytes]) -> list[str]:
    """The differences between the golden files and `want`, readable."""
    problems = []
    on_disk = {str(p.relative_to(case_dir)) for p in case_dir.rglob("*") if p.is_file()} if case_dir.is_dir() else set()
    for rel, data in want.items():
        path = case_dir / rel
        if rel not in on_disk:
            problems.append(f"{path}: missing")
            continue
        have = path.read_bytes()
        if have != data:
            diff = difflib.unified_diff(_visible(have), _visible(data), f"golden/{case_dir.name}/{rel}", "rendered")
            problems.append("".join(diff))
    for rel in sorted(on_disk - set(want)):
        problems.append(f"{case_dir / rel}: not rendered any more (stale)")
    return problems


def write(case_dir: Path, want: dict[str, bytes]) -> None:
    for p in sorted(case_dir.rglob("*"), reverse=True) if case_dir.is_dir() else ():
        if p.is_file() and str(p.relative_to(case_dir)) not in want:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    for rel, data in want.items():
        path = case_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    want = rendered(CASES[case])
    case_dir = GOLDEN / case
    if UPDATE:
        write(case_dir, want)
    problems = compare(case_dir, want)
    assert not problems, "\n".join(problems) + "\n(TETHER_GOLDEN_UPDATE=1 rewrites them: review the diff)"


def test_no_golden_directory_without_a_case():
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(CASES)


def test_the_comparison_can_fail(tmp_path):
    want = {"views": b"web ip=10.0.0.2\n", "web/hosts": b"10.0.0.2\tweb\n"}
    write(tmp_path, want)
    assert compare(tmp_path, want) == []
    (tmp_path / "web" / "hosts").write_bytes(b"10.0.0.2 web\n")  # a space for the tab
    (tmp_path / "web" / "stale").write_bytes(b"")
    problems = compare(tmp_path, want | {"web/env": b""})
    assert any("-10.0.0.2 web" in p and "+10.0.0.2\\tweb" in p for p in problems), problems
    assert any(p.endswith("web/env: missing") for p in problems), problems
    assert any("stale" in p for p in problems), problems
    write(tmp_path, want)  # an update removes what is not rendered
    assert compare(tmp_path, want) == []


def test_the_cases_cover_what_they_claim():
    # every link state, and files that differ between the strategies
    states = {link.state for c in CASES.values() for v in graph.views(c.topo).values() for link in v.links}
    assert states == {"running", "stopped", "dangling"}
    assert rendered(CASES["facade"])["web/hosts"] != rendered(CASES["direct"])["web/hosts"]
