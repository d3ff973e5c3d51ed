"""fused.config: TOML settings with defaults (DESIGN "Configuration")."""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from fused import config
from fused.config import Config, ConfigError, load


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("TETHER_CONFIG", raising=False)


def toml(tmp_path: Path, text: str, name: str = "tether.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def assert_defaults(c: Config) -> None:
    assert c.state_dir == Path("/var/lib/tether")
    assert c.run_dir == Path("/run/tether")
    assert c.network.bridge == "tether0"
    assert c.network.subnet == "10.213.0.0/16"
    assert c.network.facade_subnet == "10.214.0.0/16"
    assert c.network.port_range == "40000-44999"
    assert c.network.ports == range(40000, 45000)
    assert c.network.strategy == "facade"
    assert c.firewall.driver == "auto"
    assert c.firewall.chain_prefix == "TETHER"
    assert c.dns.enabled is True
    assert c.dns.upstreams == ["host"]
    assert c.socket_path == Path("/run/tether/fused.sock")
    assert c.fs_dir == Path("/run/tether/fs")
    assert c.db_path == Path("/var/lib/tether/tether.db")


def test_empty_file_gives_defaults(tmp_path):
    p = toml(tmp_path, "")
    c = load(str(p))
    assert_defaults(c)
    assert c.source == p.resolve()


def test_no_file_anywhere_gives_builtin_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    c = load()
    assert_defaults(c)
    assert c.source is None


def test_default_path_is_used_when_present(tmp_path, monkeypatch):
    p = toml(tmp_path, 'run_dir = "/run/from-default"\n')
    monkeypatch.setattr(config, "DEFAULT_PATH", str(p))
    c = load()
    assert c.run_dir == Path("/run/from-default")
    assert c.source == p.resolve()


def test_env_var_is_used_without_explicit_path(tmp_path, monkeypatch):
    p = toml(tmp_path, 'run_dir = "/run/from-env"\n')
    monkeypatch.setenv("TETHER_CONFIG", str(p))
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    c = load()
    assert c.run_dir == Path("/run/from-env")
    assert c.source == p.resolve()


def test_explicit_path_wins_over_env(tmp_path, monkeypatch):
    env = toml(tmp_path, 'run_dir = "/run/env"\n', "env.toml")
    explicit = toml(tmp_path, 'run_dir = "/run/explicit"\n', "explicit.toml")
    monkeypatch.setenv("TETHER_CONFIG", str(env))
    assert load(str(explicit)).run_dir == Path("/run/explicit")


def test_overrides(tmp_path):
    p = toml(
        tmp_path,
        """
state_dir = "/tmp/t/state"
run_dir = "/tmp/t/run"

[network]
bridge = "tt1"
subnet = "10.99.0.0/24"
facade_subnet = "10.98.0.0/24"
port_range = "40000-40010"
strategy = "direct"

[firewall]
driver = "none"
chain_prefix = "TT1"

[dns]
enabled = false
upstreams = []
""",
    )
    c = load(str(p))
    assert c.state_dir == Path("/tmp/t/state")
    assert c.db_path == Path("/tmp/t/state/tether.db")
    assert c.socket_path == Path("/tmp/t/run/fused.sock")
    assert c.network.bridge == "tt1"
    assert c.network.network == ipaddress.IPv4Network("10.99.0.0/24")
    assert c.network.facade_network == ipaddress.IPv4Network("10.98.0.0/24")
    assert c.network.ports == range(40000, 40011)
    assert c.network.strategy == "direct"
    assert c.firewall.driver == "none"
    assert c.firewall.chain_prefix == "TT1"
    assert c.dns.enabled is False
    assert c.dns.upstreams == []


def test_partial_section_keeps_other_defaults(tmp_path):
    c = load(str(toml(tmp_path, '[network]\nbridge = "br-x"\n')))
    assert c.network.bridge == "br-x"
    assert c.network.subnet == "10.213.0.0/16"
    assert c.firewall.chain_prefix == "TETHER"


@pytest.mark.parametrize(
    "subnet, gateway", [("10.213.0.0/16", "10.213.0.1"), ("192.168.50.0/29", "192.168.50.1"), ("10.1.2.0/24", "10.1.2.1")]
)
def test_gateway_is_the_first_host(tmp_path, subnet, gateway):
    c = load(str(toml(tmp_path, f'[network]\nsubnet = "{subnet}"\nfacade_subnet = "172.31.0.0/16"\n')))
    assert str(c.network.gateway) == gateway
    assert c.network.gateway == next(c.network.network.hosts())


@pytest.mark.parametrize(
    "text, where",
    [
        ("colour = 1\n", "colour"),
        ('[network]\nbridg = "x"\n', "network.bridg"),
        ("[extra]\nx = 1\n", "extra"),
        ('[dns]\nupstream = ["1.1.1.1"]\n', "dns.upstream"),
    ],
)
def test_unknown_keys_are_errors(tmp_path, text, where):
    p = toml(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert str(p) in str(ei.value)
    assert where in str(ei.value)


def test_source_key_in_file_is_a_config_error(tmp_path):
    p = toml(tmp_path, 'source = "/elsewhere.toml"\n')
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert str(p) in str(ei.value) and "source" in str(ei.value)
    # the real source is the file itself
    assert load(str(toml(tmp_path, ""))).source == (tmp_path / "tether.toml").resolve()


@pytest.mark.parametrize(
    "subnet",
    ["10.213.0.0/30", "10.213.0.1/16", "not-a-net", "10.213.0.0/33", "fd00::/64", "300.1.0.0/16"],
)
def test_bad_subnet(tmp_path, subnet):
    with pytest.raises(ConfigError, match=r"network\.subnet"):
        load(str(toml(tmp_path, f'[network]\nsubnet = "{subnet}"\n')))


def test_smallest_subnet_is_a_29(tmp_path):
    c = load(str(toml(tmp_path, '[network]\nsubnet = "10.213.0.0/29"\n')))
    assert c.network.network.num_addresses == 8


def test_subnet_is_normalised(tmp_path):
    c = load(str(toml(tmp_path, '[network]\nsubnet = "10.7.0.0/255.255.0.0"\n')))
    assert c.network.subnet == "10.7.0.0/16"


@pytest.mark.parametrize(
    "subnet, facade",
    [
        ("10.213.0.0/16", "10.213.5.0/24"),
        ("10.0.0.0/8", "10.214.0.0/16"),
        ("10.214.0.0/24", "10.214.0.0/16"),
        ("10.214.0.0/16", "10.214.0.0/16"),
    ],
)
def test_overlapping_subnets(tmp_path, subnet, facade):
    p = toml(tmp_path, f'[network]\nsubnet = "{subnet}"\nfacade_subnet = "{facade}"\n')
    with pytest.raises(ConfigError, match="overlap"):
        load(str(p))


def test_default_facade_overlaps_a_wide_subnet(tmp_path):
    with pytest.raises(ConfigError, match="overlap"):
        load(str(toml(tmp_path, '[network]\nsubnet = "10.0.0.0/8"\n')))


@pytest.mark.parametrize("rng", ["30000", "0-10", "5-4", "30000-70000", "a-b", "30000-", "-5", "", "1-2-3", " 1-2"])
def test_bad_port_range(tmp_path, rng):
    with pytest.raises(ConfigError, match=r"network\.port_range"):
        load(str(toml(tmp_path, f'[network]\nport_range = "{rng}"\n')))


def test_single_port_range(tmp_path):
    c = load(str(toml(tmp_path, '[network]\nport_range = "1-1"\n')))
    assert c.network.ports == range(1, 2)


@pytest.mark.parametrize("bridge", ["b" * 16, "", "br 0", "br/0", "br:0", "br\n0"])
def test_bad_bridge_name(tmp_path, bridge):
    with pytest.raises(ConfigError, match=r"network\.bridge"):
        load(str(toml(tmp_path, f"[network]\nbridge = {json.dumps(bridge)}\n")))


def test_bridge_of_15_chars_is_fine(tmp_path):
    assert load(str(toml(tmp_path, f'[network]\nbridge = "{"b" * 15}"\n'))).network.bridge == "b" * 15


@pytest.mark.parametrize("bridge", ["\u00e9" * 15, "\u00e9", "br\u00b2", "\uff42r0", "..", "."])
def test_bridge_must_be_a_linux_interface_name(tmp_path, bridge):
    with pytest.raises(ConfigError, match=r"network\.bridge"):
        load(str(toml(tmp_path, f'[network]\nbridge = "{bridge}"\n')))


@pytest.mark.parametrize("prefix", ["", "T" * 13, "TE THER", "TE:THER"])
def test_bad_chain_prefix(tmp_path, prefix):
    with pytest.raises(ConfigError, match=r"firewall\.chain_prefix"):
        load(str(toml(tmp_path, f'[firewall]\nchain_prefix = "{prefix}"\n')))


@pytest.mark.parametrize(
    "text, where",
    [
        ('[network]\nstrategy = "teleport"\n', "network.strategy"),
        ('[firewall]\ndriver = "pf"\n', "firewall.driver"),
        ('[dns]\nupstreams = "host"\n', "dns.upstreams"),
    ],
)
def test_bad_enums_and_types(tmp_path, text, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load(str(toml(tmp_path, text)))


def test_invalid_toml(tmp_path):
    p = toml(tmp_path, "state_dir = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(p))


def test_missing_explicit_file(tmp_path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load(str(p))
    assert str(p) in str(ei.value)
    assert "--config" in str(ei.value)


def test_config_is_frozen(tmp_path):
    c = load(str(toml(tmp_path, "")))
    with pytest.raises(Exception):
        c.run_dir = Path("/elsewhere")  # type: ignore[misc]
    assert c.run_dir == Path("/run/tether")


@pytest.mark.parametrize("prefix", ["\u00c9" * 12, "\u00c9", "T\u00b2", "TETHER."])
def test_chain_prefix_is_ascii(tmp_path, prefix):
    with pytest.raises(ConfigError, match=r"firewall\.chain_prefix"):
        load(str(toml(tmp_path, '[firewall]\nchain_prefix = "' + prefix + '"\n')))


@pytest.mark.parametrize("prefix", ["T", "T" * 12, "te-th_er9"])
def test_good_chain_prefix(tmp_path, prefix):
    assert load(str(toml(tmp_path, f'[firewall]\nchain_prefix = "{prefix}"\n'))).firewall.chain_prefix == prefix
