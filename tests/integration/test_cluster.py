"""Several hosts (DESIGN "Multi-host"): each host a network namespace of the
test's own with its own tether-fused, one address space in one etcd (a
throwaway one, on the underlay), the hosts' bridges joined by VXLAN. All
traffic stays among these namespaces."""
from __future__ import annotations

import pytest

from cluster import Cluster
from harness import address_in_hosts, serve, tcp_get, wait_for


@pytest.fixture(scope="module")
def cluster(rootfs):
    c = Cluster(rootfs, n=3, strategy="facade")
    try:
        c.start()
        yield c
    finally:
        c.close()


def nc(d, cid: str, host: str, port: int = 5432) -> str:
    """What `host`:port answers, from inside container `cid`."""
    p = d.exec(cid, "sh", "-c", f"nc -w 2 {host} {port} </dev/null", check=False)
    return p.stdout.strip()


def hosts_of(d, name: str) -> str:
    return (d.run_dir / "fs" / name / "hosts").read_text()


def test_a_link_across_hosts_by_name_and_by_address(cluster):
    h1, h2 = cluster["h1"], cluster["h2"]
    h1.start_container("web", serve("web"), "--expose", "5432")
    h2.start_container("app", ["sleep", "1000000"], "--link", "web:db")
    web_ip = h1.container("web")["ip"]
    assert h2.container("web")["ip"] == web_ip  # one address space
    wait_for(lambda: "db" in hosts_of(h2, "app"), 5, what="app's hosts to name db")
    assert nc(h2, "app", web_ip) == "web"  # by address, through the overlay
    assert nc(h2, "app", "db") == "web"  # by its link (the facade, DNAT'ed on app's host)
