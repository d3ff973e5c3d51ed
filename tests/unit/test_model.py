"""fused.model: labels, MACs and the parsing of annotations (DESIGN "Annotations")."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fused import model
from fused.model import (
    InputError,
    LinkSpec,
    PortSpec,
    PublishSpec,
    Registration,
    check_label,
    is_label,
    mac_for,
    parse_expose,
    parse_links,
    parse_publish,
    parse_registration,
)

# --- labels ------------------------------------------------------------------

VALID = ["a", "0", "db-2", "a" * 63, "x" + "-" * 61 + "y", "9lives", "web01"]
INVALID = ["", "UPPER", "Db", "-x", "x-", "a" * 64, "a b", "a\nb", "a\n", "../x", "a.b", "a_b", "é", " a", "a\0"]


@pytest.mark.parametrize("s", VALID)
def test_valid_labels(s):
    assert is_label(s) is True
    assert check_label(s) == s


@pytest.mark.parametrize("s", INVALID)
def test_invalid_labels(s):
    assert is_label(s) is False
    with pytest.raises(InputError) as ei:
        check_label(s, "link alias")
    msg = str(ei.value)
    assert "invalid link alias" in msg
    assert "RFC 1123" in msg
    assert "\n" not in msg  # one line, even for a name with a newline


@pytest.mark.parametrize("v", [None, 1, b"db", ["db"], 1.5, True])
def test_non_str_is_not_a_label(v):
    assert is_label(v) is False
    with pytest.raises(InputError):
        check_label(v)


def test_check_label_message_truncates_huge_input():
    with pytest.raises(InputError) as ei:
        check_label("X" * 10_000)
    assert len(str(ei.value)) < 300
    assert "..." in str(ei.value)


@given(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True))
def test_label_regex_roundtrip(s):
    assert is_label(s)
    assert 1 <= len(s) <= 63


@given(st.text(max_size=70))
def test_is_label_agrees_with_the_rfc1123_definition(s):
    expect = (
        1 <= len(s) <= 63
        and all(c in "abcdefghijklmnopqrstuvwxyz0123456789-" for c in s)
        and s[0] != "-"
        and s[-1] != "-"
    )
    assert is_label(s) == expect


# --- mac_for -----------------------------------------------------------------


def test_mac_for_known_values():
    assert mac_for("10.213.0.2") == "02:74:0a:d5:00:02"
    assert mac_for("255.0.128.1") == "02:74:ff:00:80:01"


@given(st.ip_addresses(v=4))
def test_mac_is_locally_administered_unicast_and_encodes_the_ip(ip):
    mac = mac_for(str(ip))
    octets = mac.split(":")
    assert len(octets) == 6
    assert all(len(o) == 2 and o == o.lower() for o in octets)
    first = int(octets[0], 16)
    assert first & 0x01 == 0  # unicast
    assert first & 0x02 == 0x02  # locally administered
    assert octets[:2] == ["02", "74"]
    assert bytes(int(o, 16) for o in octets[2:]) == ipaddress.IPv4Address(ip).packed


def test_mac_for_rejects_non_ipv4():
    with pytest.raises(ValueError):
        mac_for("fe80::1")
    with pytest.raises(ValueError):
        mac_for("not an ip")


# --- parse_links -------------------------------------------------------------


def test_parse_links_plain_and_aliased():
    assert parse_links("db") == [LinkSpec("db", "db")]
    assert parse_links("db:database") == [LinkSpec("database", "db")]


def test_parse_links_sorted_by_alias_and_trims_spaces():
    got = parse_links(" web:zeta , db:database,cache ")
    assert got == [LinkSpec("cache", "cache"), LinkSpec("database", "db"), LinkSpec("zeta", "web")]
    assert [str(x) for x in got] == ["cache", "db:database", "web:zeta"]


def test_parse_links_empty():
    assert parse_links("") == []
    assert parse_links(" , ,") == []


def test_parse_links_same_link_twice_is_one_link():
    assert parse_links("db,db") == [LinkSpec("db", "db")]
    assert parse_links("db:x,db:x") == [LinkSpec("x", "db")]


def test_parse_links_one_target_two_aliases_is_fine():
    assert parse_links("db:a,db:b") == [LinkSpec("a", "db"), LinkSpec("b", "db")]


def test_parse_links_alias_used_twice_is_an_error_naming_the_key():
    with pytest.raises(InputError) as ei:
        parse_links("db:database,db2:database")
    assert str(ei.value).startswith("io.tether.links:")
    assert "'database'" in str(ei.value)
    # a bare target counts as its own alias
    with pytest.raises(InputError):
        parse_links("db,other:db")


def test_parse_links_empty_alias_defaults_to_target():
    assert parse_links("db:") == [LinkSpec("db", "db")]


@pytest.mark.parametrize("bad", ["DB", "db:Alias", "a b", "db:a:b", "../etc", "db:x\ny", "-db", ":db"])
def test_parse_links_bad_label_names_the_key(bad):
    with pytest.raises(InputError) as ei:
        parse_links(bad)
    assert str(ei.value).startswith("io.tether.links: invalid link ")
    assert "\n" not in str(ei.value)


def test_parse_links_custom_key_in_message():
    with pytest.raises(InputError, match=r"^--link: "):
        parse_links("BAD", key="--link")


# --- parse_expose ------------------------------------------------------------


def test_parse_expose_ports_and_protocols():
    assert parse_expose("5432,5433/udp") == [PortSpec(5432, "tcp"), PortSpec(5433, "udp")]
    assert parse_expose("53/udp, 53/tcp,53") == [PortSpec(53, "tcp"), PortSpec(53, "udp")]
    assert parse_expose("1,65535") == [PortSpec(1), PortSpec(65535)]
    assert parse_expose("") == []


def test_parse_expose_sorted_and_str():
    got = parse_expose("9000,80/udp,80")
    assert [str(p) for p in got] == ["80/tcp", "80/udp", "9000/tcp"]


@pytest.mark.parametrize(
    "bad, part",
    [
        ("5432/sctp", "'sctp'"),
        ("5432/TCP", "'TCP'"),
        ("0", "'0'"),
        ("70000", "'70000'"),
        ("65536", "'65536'"),
        ("abc", "'abc'"),
        ("-1", "'-1'"),
        ("/udp", "''"),
        ("80,x", "'x'"),
        ("8 0", "'8 0'"),
    ],
)
def test_parse_expose_rejects_bad_parts_naming_key_and_part(bad, part):
    with pytest.raises(InputError) as ei:
        parse_expose(bad)
    msg = str(ei.value)
    assert msg.startswith("io.tether.expose: ")
    assert part in msg


@pytest.mark.parametrize("bad", ["²", "80²", "9" * 5000, "\uff15\uff14\uff13\uff12", "000080", "\u0668\u0660"])
def test_parse_expose_unicode_or_huge_digits_give_input_error(bad):
    with pytest.raises(InputError, match="io.tether.expose"):
        parse_expose(bad)


@pytest.mark.parametrize("bad", ["\uff18\uff10\uff18\uff10:80", "8080:\uff18\uff10", "9" * 5000 + ":80", "000080:80"])
def test_parse_publish_unicode_or_huge_digits_give_input_error(bad):
    with pytest.raises(InputError, match="io.tether.publish"):
        parse_publish(bad)


def test_port_of_five_ascii_digits_with_leading_zeros_is_fine():
    assert parse_expose("00080") == parse_expose("80")


# --- parse_publish -----------------------------------------------------------


def test_parse_publish_forms():
    assert parse_publish("8080:80") == [PublishSpec(80, "tcp", 8080)]
    assert parse_publish("80") == [PublishSpec(80, "tcp", None)]
    assert parse_publish("53/udp") == [PublishSpec(53, "udp", None)]
    assert parse_publish("5353:53/udp") == [PublishSpec(53, "udp", 5353)]
    assert parse_publish("") == []


def test_parse_publish_str_roundtrip():
    got = parse_publish("8080:80, 443, 5353:53/udp")
    assert [str(p) for p in got] == ["5353:53/udp", "8080:80/tcp", "443/tcp"]  # sorted by port
    assert parse_publish(",".join(str(p) for p in got)) == got


def test_parse_publish_same_port_different_protocols():
    assert parse_publish("53,53/udp") == [PublishSpec(53, "tcp"), PublishSpec(53, "udp")]
    assert parse_publish("5353:53,5353:53/udp") == [PublishSpec(53, "tcp", 5353), PublishSpec(53, "udp", 5353)]


def test_parse_publish_duplicate_port_is_an_error():
    with pytest.raises(InputError) as ei:
        parse_publish("8080:80,8081:80")
    assert str(ei.value).startswith("io.tether.publish: ")
    assert "80/tcp" in str(ei.value)
    with pytest.raises(InputError):
        parse_publish("80,80")


def test_parse_publish_duplicate_host_port_is_an_error():
    with pytest.raises(InputError) as ei:
        parse_publish("8080:80,8080:81")
    assert str(ei.value).startswith("io.tether.publish: ")
    assert "8080/tcp" in str(ei.value)


@pytest.mark.parametrize("bad", ["0:80", "70000:80", "x:80", ":80", "8080:", "8080:80/icmp", "1:2:80", "80/udp/tcp"])
def test_parse_publish_bad_values(bad):
    with pytest.raises(InputError, match=r"^io\.tether\.publish: "):
        parse_publish(bad)


# --- parse_registration ------------------------------------------------------

STATE = {"ociVersion": "1.0.2", "id": "db", "status": "creating", "pid": 4242, "bundle": "/b/db"}


def state(**kw):
    s = dict(STATE)
    s.update(kw)
    return {k: v for k, v in s.items() if v is not ...}


def test_registration_name_from_id():
    r = parse_registration(state(), None)
    assert r == Registration("db", "db", 4242, "/b/db", [], [], [])


def test_registration_name_from_annotation_wins_over_id():
    r = parse_registration(
        state(id="0123ABCDEF_long-runc-id"),
        {
            "io.tether.name": "web",
            "io.tether.links": "db:database",
            "io.tether.expose": "80",
            "io.tether.publish": "8080:80",
            "org.other": "whatever",
        },
    )
    assert r.id == "0123ABCDEF_long-runc-id"
    assert r.name == "web"
    assert r.links == [LinkSpec("database", "db")]
    assert r.expose == [PortSpec(80)]
    assert r.publish == [PublishSpec(80, "tcp", 8080)]


def test_registration_bundle_defaults_to_empty():
    assert parse_registration(state(bundle=...), {}).bundle == ""


@pytest.mark.parametrize("cid", [..., "", None, 7, "a\nb", "a\0b", "x" * 1025])
def test_registration_requires_a_valid_id(cid):
    with pytest.raises(InputError, match="'id'"):
        parse_registration(state(id=cid), {"io.tether.name": "db"})


@pytest.mark.parametrize("pid", [..., 0, -1, True, False, "4242", 4242.0, None])
def test_registration_requires_a_positive_int_pid(pid):
    with pytest.raises(InputError, match="'pid'"):
        parse_registration(state(pid=pid), None)


def test_registration_state_must_be_an_object():
    for bad in (None, [], "db", 1):
        with pytest.raises(InputError, match="JSON object"):
            parse_registration(bad, None)


def test_registration_invalid_id_without_annotation_names_the_annotation():
    with pytest.raises(InputError) as ei:
        parse_registration(state(id="My_Container"), {})
    assert "io.tether.name" in str(ei.value)
    assert "'My_Container'" in str(ei.value)


@pytest.mark.parametrize("name", ["web\nevil", "Web", "w" * 64, "", "a b", "../x"])
def test_registration_invalid_annotation_name_mentions_the_key(name):
    # even when the id itself would be a fine name
    with pytest.raises(InputError) as ei:
        parse_registration(state(), {"io.tether.name": name})
    msg = str(ei.value)
    assert msg.startswith("io.tether.name: ")
    assert "\n" not in msg


@pytest.mark.parametrize("ann", [[], "x", {"io.tether.name": 5}, {"io.tether.links": ["db"]}])
def test_registration_annotations_must_be_strings(ann):
    with pytest.raises(InputError, match="annotations"):
        parse_registration(state(), ann)


@pytest.mark.parametrize(
    "key, value", [("io.tether.links", "DB"), ("io.tether.expose", "abc"), ("io.tether.publish", "0:80")]
)
def test_registration_bad_annotation_value_names_its_key(key, value):
    with pytest.raises(InputError) as ei:
        parse_registration(state(), {key: value})
    assert str(ei.value).startswith(key + ": ")


def test_registration_bundle_must_be_str():
    with pytest.raises(InputError, match="bundle"):
        parse_registration(state(bundle=5), None)


def test_annotation_key_constants():
    assert (model.ANN_NAME, model.ANN_LINKS, model.ANN_EXPOSE, model.ANN_PUBLISH) == (
        "io.tether.name",
        "io.tether.links",
        "io.tether.expose",
        "io.tether.publish",
    )
