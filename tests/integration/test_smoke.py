from harness import tcp_get


def test_smoke(daemon):
    daemon.start_container("db")
    c = daemon.container("db")
    assert c["state"] == "running" and c["ip"]
    assert tcp_get(c["ip"], 5432).strip() == "db"
