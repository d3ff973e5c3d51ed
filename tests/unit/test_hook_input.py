"""fused.service.hook_input: the daemon's side of a hook request.

The hook forwards the OCI state unparsed (`state_json`); the daemon parses and
checks it and reads the annotations, from the state or else from the bundle's
config.json (DESIGN "Hooks").
"""
from __future__ import annotations

import json
import os

import pytest

from fused import model
from fused.model import InputError
from fused.service import MAX_STATE, hook_input
from hooks.hook import request_line

ANN = {"io.tether.name": "db", "io.tether.expose": "5432"}
STATE = {"ociVersion": "1.0.2", "id": "db", "status": "creating", "pid": 4242, "bundle": "/nonexistent/bundle"}


def args_of(state, stage: str = "createRuntime") -> dict:
    raw = state if isinstance(state, str) else json.dumps(state)
    return {"stage": stage, "state_json": raw}


@pytest.fixture
def bundle(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {"io.tether.name": "web", "x": "y"}}))
    return b


# --- valid states ------------------------------------------------------------


def test_state_with_annotations():
    state = {**STATE, "annotations": ANN}
    got_state, got_ann, _ = hook_input(args_of(state))
    assert got_state == state
    assert got_ann == ANN


def test_state_annotations_win_over_the_bundle(bundle):
    state = {**STATE, "bundle": str(bundle), "annotations": ANN}
    assert hook_input(args_of(state))[1] == ANN


@pytest.mark.parametrize("missing", [{}, {"annotations": None}, {"annotations": {}}])
def test_annotations_are_read_from_an_absolute_bundle(bundle, missing):
    state = {**STATE, "bundle": str(bundle), **missing}
    got_state, got_ann, _ = hook_input(args_of(state))
    assert got_state == state
    assert got_ann == {"io.tether.name": "web", "x": "y"}


def test_a_pretty_printed_non_ascii_state_is_parsed(bundle):
    state = {**STATE, "bundle": str(bundle), "id": "caf\u00e9 \U0001f600"}
    raw = json.dumps(state, indent=2, ensure_ascii=False) + "\n"
    assert hook_input(args_of(raw))[:2] == (state, {"io.tether.name": "web", "x": "y"})


@pytest.mark.parametrize("bundle_value", ["relative/bundle", "bundle", "", ".", 5, None, ["/"], {"a": 1}])
def test_a_relative_or_non_string_bundle_is_not_read(tmp_path, monkeypatch, bundle_value):
    # a config.json in the daemon's working directory must not be picked up
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "relative" / "bundle")
    for d in (tmp_path, tmp_path / "relative" / "bundle"):
        (d / "config.json").write_text(json.dumps({"annotations": {"io.tether.name": "evil"}}))
    state = {**STATE, "bundle": bundle_value}
    assert hook_input(args_of(state))[1] is None
    state["annotations"] = {}
    assert hook_input(args_of(state))[1] == {}


@pytest.mark.parametrize(
    "content",
    [
        b"{broken",
        b"",
        b"[1, 2]",
        b'"config"',
        b'{"annotations": ["a"]}',
        b'{"annotations": "io.tether.name=web"}',
        b'{"annotations": null}',
        b'{"ociVersion": "1.0.2"}',
        b'{"annotations": {"io.tether.name": "caf\xe9"}}',  # not UTF-8
    ],
)
def test_a_broken_bundle_config_is_ignored(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    state = {**STATE, "bundle": str(tmp_path)}
    assert hook_input(args_of(state))[1] is None
    assert hook_input(args_of({**state, "annotations": {}}))[1] == {}


def test_a_missing_or_unreadable_bundle_config_is_ignored(tmp_path):
    assert hook_input(args_of({**STATE, "bundle": str(tmp_path / "nope")}))[1] is None
    assert hook_input(args_of({**STATE, "bundle": str(tmp_path)}))[1] is None  # no config.json
    (tmp_path / "config.json").mkdir()
    assert hook_input(args_of({**STATE, "bundle": str(tmp_path)}))[1] is None


def test_annotations_that_are_not_an_object_are_passed_on_for_parse_registration():
    state, ann, _ = hook_input(args_of({**STATE, "annotations": "io.tether.name=db"}))
    assert ann == "io.tether.name=db"
    with pytest.raises(InputError, match="annotations must be a JSON object"):
        model.parse_registration(state, ann)


def test_args_are_not_changed():
    args = args_of({**STATE, "annotations": ANN})
    before = dict(args)
    hook_input(args)
    assert args == before


def test_what_the_hook_sends_registers(bundle):
    # the hook's request line, as the control server hands it to the service
    raw = json.dumps({**STATE, "bundle": str(bundle), "id": "0123abc"}, indent=1)
    req = json.loads(request_line("register", "createRuntime", raw))
    reg = model.parse_registration(*hook_input(req["args"])[:2])
    assert (reg.id, reg.name, reg.pid, reg.bundle) == ("0123abc", "web", 4242, str(bundle))


def test_a_state_of_exactly_max_size_is_accepted():
    body = json.dumps(STATE)
    raw = body + " " * (MAX_STATE - len(body))
    assert len(raw) == MAX_STATE == 1 << 20
    assert hook_input({"state_json": raw})[0] == STATE


# --- refused -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["{", "", " ", "{'id': 'db'}", '{"id": "db"} trailing', '{"id": "db",}', "\ufffd\ufffd", "nul", "\x00"]
)
def test_malformed_json_is_an_input_error(raw):
    with pytest.raises(InputError) as ei:
        hook_input({"stage": "createRuntime", "state_json": raw})
    msg = str(ei.value)
    assert "not valid JSON" in msg
    assert "OCI runtime" in msg  # and the fix
    assert "\n" not in msg


def test_huge_integers_are_an_input_error_not_a_crash():
    with pytest.raises(InputError, match="not valid JSON"):
        hook_input({"state_json": '{"id": "db", "pid": ' + "9" * 5000 + "}"})


@pytest.mark.parametrize("raw", ["[1, 2]", '"db"', "null", "5", "true", "[]", '[{"id": "db"}]'])
def test_a_state_that_is_not_an_object_is_an_input_error(raw):
    with pytest.raises(InputError) as ei:
        hook_input({"state_json": raw})
    assert "must be a JSON object" in str(ei.value)
    assert "OCI runtime" in str(ei.value)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"stage": "createRuntime"},
        {"state_json": None},
        {"state_json": 5},
        {"state_json": b"{}"},
        {"state_json": STATE},  # already parsed: an old hook's request
        {"state": STATE, "annotations": ANN},  # the old request format
        {"state_json": ["{}"]},
    ],
)
def test_missing_state_json_is_an_input_error(args):
    with pytest.raises(InputError) as ei:
        hook_input(args)
    assert "no OCI state" in str(ei.value)


def test_an_oversized_state_is_an_input_error():
    with pytest.raises(InputError, match="no OCI state"):
        hook_input({"state_json": " " * (MAX_STATE + 1)})
    with pytest.raises(InputError):
        hook_input({"state_json": json.dumps({**STATE, "pad": "x" * MAX_STATE})})


def test_a_deeply_nested_state_is_an_input_error():
    raw = '{"id": "db", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert len(raw) < MAX_STATE
    with pytest.raises(InputError):
        hook_input({"state_json": raw})


def test_a_deeply_nested_bundle_config_is_ignored(tmp_path):
    (tmp_path / "config.json").write_text('{"annotations": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert hook_input(args_of({**STATE, "bundle": str(tmp_path)}))[1] is None
