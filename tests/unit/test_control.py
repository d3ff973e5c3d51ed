"""control: one request line in, one answer line out; errors mapped in one place.

The socket side (root only, SO_PEERCRED) is run against the hook in
test_hook.py; here are the pure parts: parsing a request and turning an error
into its answer.
"""
from __future__ import annotations

import logging
import re
import sys
import types

import pytest

from fused import config, control, errors, model, protocol
from fused.net import wiring


def answered(line: bytes) -> str:
    with pytest.raises(protocol.DaemonError) as ei:
        protocol.decode(line)
    return str(ei.value)


@pytest.mark.parametrize(
    "cls", [errors.TetherError, errors.InputError, errors.ConfigError, errors.StoreError, errors.WiringError, errors.ServiceError]
)
def test_a_tether_error_is_answered_with_its_message_and_not_logged(cls, caplog):
    with caplog.at_level(logging.DEBUG, logger="tether.control"):
        line = control.error_answer(cls("no container named 'db': see `tether ps`"))
    assert line == protocol.error_line("no container named 'db': see `tether ps`")
    assert caplog.records == []


def test_a_bug_is_answered_as_internal_error_and_logged_with_its_traceback(caplog):
    try:
        {}["db"]
    except KeyError as e:
        with caplog.at_level(logging.ERROR, logger="tether.control"):
            line = control.error_answer(e)
    assert answered(line) == "internal error: KeyError: 'db'; see the tether-fused log"
    (record,) = caplog.records
    assert record.getMessage() == "request failed"
    assert record.exc_info and record.exc_info[0] is KeyError


def test_a_plain_value_error_is_a_bug_not_input(caplog):
    # InputError is a ValueError; the reverse is not true
    with caplog.at_level(logging.ERROR, logger="tether.control"):
        assert answered(control.error_answer(ValueError("x"))).startswith("internal error: ValueError: x")


def test_the_layers_raise_the_one_hierarchy():
    assert model.InputError is errors.InputError
    assert config.ConfigError is errors.ConfigError
    assert wiring.WiringError is errors.WiringError
    from fused import service
    from fused.store import sqlite

    assert service.ServiceError is errors.ServiceError and sqlite.StoreError is errors.StoreError
    assert issubclass(errors.InputError, ValueError)  # parsers catch it as one
    for cls in (errors.InputError, errors.ConfigError, errors.StoreError, errors.WiringError, errors.ServiceError):
        assert issubclass(cls, errors.TetherError)


def test_bad_input_from_a_model_parser_is_answered_with_its_message():
    with pytest.raises(errors.TetherError) as ei:
        model.check_label("Bad Name")
    assert answered(control.error_answer(ei.value)) == str(ei.value)


@pytest.mark.parametrize(
    "line, words",
    [
        (b"{", "not valid JSON"),
        (b"[1]", "JSON object with an 'op'"),
        (b'{"v": 1}', "JSON object with an 'op'"),
        (b'{"v": 2, "op": "ps"}', "protocol version 2 is not supported (daemon speaks 1)"),
        (b'{"op": "ps"}', "protocol version None is not supported"),
        (b'{"v": 1, "op": "ps", "args": [1]}', "'args' must be a JSON object"),
    ],
)
def test_a_bad_request_line_is_input_error(line, words):
    with pytest.raises(errors.InputError, match=re.escape(words)):
        control.parse_request(line)


def test_a_request_line_round_trips():
    assert control.parse_request(protocol.request_line("link-add", {"consumer": "web"})) == ("link-add", {"consumer": "web"})
    assert control.parse_request(b'{"v": 1, "op": "ps", "args": null}') == ("ps", {})
