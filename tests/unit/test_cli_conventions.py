"""CLI conventions of podman and docker (no daemon needed)."""
from __future__ import annotations

import json
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fused import cli, model
from fused.config import Config
from fused.service import Service, rfc3339
from fused.store.sqlite import SqliteStore


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tether ")


def test_plain_tether_prints_the_command_list(capsys):
    assert cli.run([]) == 0
    out = capsys.readouterr().out
    for cmd in ("ps", "inspect", "link", "move", "rm", "oci", "doctor", "demo"):
        assert cmd in out


def test_rm_checks_every_name_before_asking(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'run_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n')
    # a bad label among them: one line, exit 1, nothing asked of a daemon
    assert cli.run(["--config", str(cfg), "rm", "ok-name", "Bad_Name"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Bad_Name" in err


# --- ps: running ones by default, -a, -q, --filter ------------------------------

T = "2026-12-03T07:40:00Z"


def record(name: str, state: str = "running", **kw) -> dict:
    """A container as the daemon's `ps` answers it."""
    return {
        "name": name, "id": f"id-{name}", "state": state, "ip": "10.213.0.2", "mac": "02:74:0a:d5:00:02",
        "pid": 7 if state == "running" else None, "expose": [], "publish": [], "links": [], "published": [],
        "started_at": T, "stopped_at": T if state == "stopped" else None, "note": "", **kw,
    }


ITEMS = [record("db"), record("old", "stopped"), record("web")]


def names(items: list[dict]) -> list[str]:
    return [c["name"] for c in items]


@pytest.mark.parametrize(
    "show_all, specs, expect",
    [
        (False, [], ["db", "web"]),
        (True, [], ["db", "old", "web"]),
        (False, ["state=stopped"], ["old"]),  # a state filter implies -a
        (False, ["state=stopped", "state=running"], ["db", "old", "web"]),  # one key: OR
        (False, ["name=db", "name=old"], ["db"]),  # without -a: old is stopped
        (True, ["name=db", "name=old"], ["db", "old"]),
        (True, ["name=db", "state=stopped"], []),  # two keys: AND
        (True, ["name=d"], []),  # a name matches exactly
    ],
)
def test_ps_selection(show_all, specs, expect):
    assert names(cli.ps_select(ITEMS, show_all, cli.ps_filters(specs))) == expect


@pytest.mark.parametrize("spec, why", [
    ("status=running", "unknown key 'status'"),
    ("state=exited", "unknown state 'exited'"),
    ("state", "use KEY=VALUE"),
    ("name=", "use KEY=VALUE"),
])
def test_ps_bad_filter_is_a_usage_error_naming_the_valid_ones(spec, why, capsys):
    assert cli.run(["ps", "--filter", spec]) == 2  # before any config or daemon
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and why in err and cli.PS_FILTERS in err, err


@pytest.fixture
def tether(monkeypatch, tmp_path, capsys):
    """`tether ARGS` against a fake daemon answering `tether.answers[op]`; its stdout."""
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'run_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n')
    answers = {"health": {"files": "ok"}, "drift": [], "ps": ITEMS}
    monkeypatch.setattr(cli, "request", lambda sock, op, args, **kw: answers[op])

    def run(*argv: str) -> str:
        assert cli.run(["--config", str(cfg), *argv]) == 0
        return capsys.readouterr().out

    run.answers = answers
    return run


def test_ps_quiet_prints_names_and_json_honours_the_selection(tether):
    assert tether("ps", "-q") == "db\nweb\n"
    assert tether("ps", "-a", "-q") == "db\nold\nweb\n"
    assert tether("ps", "--quiet", "--filter", "state=running", "--filter", "name=web") == "web\n"
    assert tether("ps", "-q", "--filter", "name=nobody") == ""
    assert names(json.loads(tether("--json", "ps"))) == ["db", "web"]
    assert names(json.loads(tether("ps", "--json", "--all"))) == ["db", "old", "web"]
    assert json.loads(tether("ps", "--json", "-a", "-q")) == ["db", "old", "web"]
    table = tether("ps")
    assert "old" not in table and "db" in table and "web" in table


def test_ps_table_writes_ports_and_links_one_way(tether):
    tether.answers["ps"] = [
        record("db", publish=["5432"], published=["0.0.0.0:40000->5432/tcp", "0.0.0.0:40000->53/udp"]),
        record("old", "stopped", publish=["80"]),  # evicted from its host port: none shown
        record("web", links=["cache->db", "database->db"]),
    ]
    head, db, old, web = tether("ps", "-a").splitlines()
    assert head.split() == ["NAME", "ID", "STATE", "IP", "PORTS", "LINKS", "STOPPED", "SINCE"]
    assert "0.0.0.0:40000->5432/tcp,0.0.0.0:40000->53/udp" in db.split()
    assert "cache->db,database->db" in web.split()
    assert old.split()[4:7] == ["-", "-", datetime.fromisoformat(T).astimezone().strftime("%Y-%m-%d")]


# --- what the daemon answers: one notation, RFC 3339 times ---------------------


@given(st.integers(1, 65535), st.integers(1, 65535), st.sampled_from(model.PROTOS))
def test_published_round_trips(hp, port, proto):
    p = model.Published(hp, port, proto)
    assert str(p) == f"0.0.0.0:{hp}->{port}/{proto}" and model.Published.parse(str(p)) == p


def test_published_parse_refuses_the_input_syntax():
    for s in ("40000:5432/tcp", "5432", "0.0.0.0:40000->5432/sctp"):
        with pytest.raises(model.InputError):
            model.Published.parse(s)


def test_link_text():
    assert model.link_text("database", "db", "web") == "web:database->db"
    assert model.link_text("database", "db") == "database->db"


@given(st.floats(0, 4e9, allow_nan=False))
def test_rfc3339_is_the_stored_time_to_the_second(ts):
    assert datetime.fromisoformat(rfc3339(ts)).timestamp() == int(ts) and rfc3339(ts).endswith("Z")
    assert rfc3339(None) is None


STOPPED_AT = 1796283600.25  # 2026-12-03T07:40:00.25Z


@pytest.fixture
def service(tmp_path):
    """A Service over a real store, with no kernel parts: only its read side is used."""
    from fused.model import Container, IpLease, Link, PortLease
    from fused.store.base import Draft

    store = SqliteStore(tmp_path / "x.db")
    d = Draft(store.snapshot())
    now = 1796280000.5
    d.put(Container("db", "id-db", "running", 100, 4026531100, "/b/db", now, now, None, "", ("5432/tcp",), ("5432",)))
    d.put_ip_lease(IpLease("10.213.0.2", "db", "02:74:0a:d5:00:02", now))
    d.put_port_lease(PortLease(40000, "tcp", "db", 5432, now))
    d.put(Container("web", "id-web", "stopped", None, None, "/b/web", now, now, STOPPED_AT))
    d.put_ip_lease(IpLease("10.213.0.3", "web", "02:74:0a:d5:00:03", now))
    d.put_group("db", "db")
    d.put_link(Link("web", "database", None, "db"))
    store.commit(d.change, d.snap.revision)
    yield Service(Config(), store, None, None, None)
    store.close()


def floats(x) -> list:
    if isinstance(x, dict):
        return [f for v in x.values() for f in floats(v)]
    if isinstance(x, list):
        return [f for v in x for f in floats(v)]
    return [x] if isinstance(x, float) else []


def test_summaries_write_ports_links_and_times_one_way(service):
    snap = service.store.snapshot()
    db = service._summary(snap, "db")
    web = service._summary(snap, "web")
    assert db["published"] == ["0.0.0.0:40000->5432/tcp"] and db["publish"] == ["5432"]  # the input stays as typed
    assert web["links"] == ["database->db"]
    assert web["stopped_at"] == "2026-12-03T07:40:00Z" and db["stopped_at"] is None
    assert datetime.fromisoformat(db["started_at"]).tzinfo is not None
    leases = service._leases(snap)
    assert [(l["kind"], l["lease"], l["maps"], l["name"]) for l in leases] == [
        ("ip", "10.213.0.2", None, "db"), ("ip", "10.213.0.3", None, "web"),
        ("port", "40000", "0.0.0.0:40000->5432/tcp", "db"),
    ]
    assert [l["stopped_at"] for l in leases] == [None, "2026-12-03T07:40:00Z", None]
    assert all(datetime.fromisoformat(l["since"]) for l in leases)
    assert floats([db, web, leases]) == []
    assert floats([{"x": [1.5]}]) == [1.5]  # the check above can fail


def test_inspect_links_in_and_text_without_reprs(service):
    import trio

    db = trio.run(service.inspect, {"name": "db"})
    web = trio.run(service.inspect, {"name": "web"})
    assert db["links_in"] == ["web:database->db"] and db["links"] == [] and web["links"] == ["database->db"]
    assert floats(db) == []
    for c in (db, web):
        record_part = cli._inspect_text(c).split("\n--- ")[0]  # the served files follow
        for repr_ in ("[", "]", "{", "None", "'"):
            assert repr_ not in record_part, (repr_, record_part)
    lines = cli._inspect_text(db).split("\nleases:")[0].splitlines()
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert fields["links_in"] == "web:database->db" and fields["published"] == "0.0.0.0:40000->5432/tcp"
    assert fields["expose"] == "5432/tcp" and fields["stopped_at"] == "-" and fields["note"] == "-"
    assert fields["started_at"] == cli._when(db["started_at"])


def test_link_and_move_messages_use_the_one_notation():
    row = {"link": "web:database->db2", "consumer": "web", "alias": "database", "target": "db2",
           "state": "running", "address": "10.214.0.1", "ports": ["5432/tcp"]}
    assert cli._printer("link_retarget")({**row, "previous": "db"}) == "web:database->db2 (was db)"
    assert cli._printer("link_add")(row) == "added web:database->db2 (running at 10.214.0.1)"
    assert cli._printer("link_add")({**row, "state": "dangling", "address": None}) == "added web:database->db2 (dangling)"
    assert cli._printer("link_rm")(row) == "removed web:database->db2"
    move = {"old": "db", "new": "db2", "links": 1, "moved": ["web:database->db2"],
            "ports": ["0.0.0.0:40000->5432/tcp"], "firewall_commits": 1}
    assert cli._printer("move")(move).splitlines() == [
        "moved db to db2: 1 link(s), 1 host port(s)", "  web:database->db2", "  0.0.0.0:40000->5432/tcp",
    ]
    handed = {**move, "addresses": [{"ip": "10.213.0.2", "from": "db", "to": "db2"}]}
    assert cli._printer("move")(handed).splitlines()[0] == "moved db to db2: 1 link(s), 1 host port(s), 1 address(es)"
    assert cli._printer("move")(handed).splitlines()[-1] == "  10.213.0.2: db->db2"
