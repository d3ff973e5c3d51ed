"""Typed settings, loaded from TOML (DESIGN "Configuration")."""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError  # config.ConfigError: the same class

DEFAULT_PATH = "/etc/tether/tether.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkConfig(_Strict):
    bridge: str = "tether0"
    subnet: str = "10.213.0.0/16"
    facade_subnet: str = "10.214.0.0/16"
    port_range: str = "40000-44999"  # not Kubernetes' NodePort range (30000-32767)
    strategy: Literal["facade", "direct", "veth-move", "reassign"] = "facade"
    # none: containers on the bridge reach each other (Docker's icc=true);
    # links: only along links, to the target's exposed ports (icc=false)
    isolation: Literal["none", "links"] = "none"

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", v) or v in (".", ".."):
            raise ValueError("bridge must be a Linux interface name (1-15 of [A-Za-z0-9-_.])")
        return v

    @field_validator("subnet", "facade_subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        net = ipaddress.IPv4Network(v, strict=True)
        if net.num_addresses < 8:
            raise ValueError("subnet must be a /29 or larger")
        return str(net)

    @field_validator("port_range")
    @classmethod
    def _ports(cls, v: str) -> str:
        lo, _, hi = v.partition("-")
        if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
            raise ValueError("port_range must look like 40000-44999")
        return v

    @model_validator(mode="after")
    def _disjoint(self) -> "NetworkConfig":
        if self.network.overlaps(self.facade_network):
            raise ValueError("subnet and facade_subnet must not overlap")
        return self

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def facade_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.facade_subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def ports(self) -> range:
        lo, _, hi = self.port_range.partition("-")
        return range(int(lo), int(hi) + 1)


class FirewallConfig(_Strict):
    # auto: nftables where libnftables works, else iptables (python-iptables)
    driver: Literal["auto", "nftables", "iptables", "none"] = "auto"
    chain_prefix: str = "TETHER"

    @field_validator("chain_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        # chain names are at most 28 characters; the longest suffix we add is
        # "-POSTROUTING" (12), plus room for a per-link suffix.
        # it names the nftables table too: nft takes a name starting with a letter
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,11}", v):
            raise ValueError("chain_prefix must be 1-12 of [A-Za-z0-9-_], starting with a letter")
        return v


class DnsConfig(_Strict):
    enabled: bool = True
    # "host": the servers of the host's /etc/resolv.conf (but loopback ones);
    # "IP" or "IP:port"; []: no forwarding, NXDOMAIN for names tether does not know
    upstreams: list[str] = Field(default_factory=lambda: ["host"])
    search: list[str] = Field(default_factory=list)  # suffixes: "database.SUFFIX" answers too
    timeout: float = Field(default=2.0, gt=0, le=30)  # seconds to wait for an upstream
    # each source address's budget (queries a second, a token bucket with a
    # second's worth of burst); past it: REFUSED, counted and logged once a second
    per_client_qps: int = Field(default=500, ge=1, le=1_000_000)

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, v: list[str]) -> list[str]:
        for u in v:
            if u == "host":
                continue
            ip, _, port = u.rpartition(":") if u.count(":") == 1 else (u, "", "")
            ipaddress.IPv4Address(ip)
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"upstream {u!r}: use IP or IP:port")
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: list[str]) -> list[str]:
        for d in v:
            labels = d.strip(".").split(".")
            if not all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", x) for x in labels):
                raise ValueError(f"search domain {d!r}: use dot-separated RFC 1123 labels")
        return [d.strip(".") for d in v]

    def upstream_servers(self, resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for u in self.upstreams:
            if u == "host":
                out += host_nameservers(resolv_conf)
            else:
                ip, _, port = u.partition(":")
                out.append((ip, int(port or 53)))
        return out


LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class StoreConfig(_Strict):
    backend: Literal["sqlite", "etcd"] = "sqlite"
    endpoints: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:2379"])  # etcd only
    prefix: str = "/tether"  # etcd only: every key lives under it
    timeout: float = Field(default=2.0, gt=0, le=8)  # seconds for one etcd request (the hook's budget is 10)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one etcd endpoint, like http://127.0.0.1:2379")
        for e in v:
            m = re.fullmatch(r"(https?)://([^/:]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})/?", e)
            if m is None or not 0 < int(m.group(3)) < 65536:
                raise ValueError(f"endpoint {e!r}: use http://HOST:PORT")
        return [e.rstrip("/") for e in v]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", v):
            raise ValueError(f"prefix {v!r}: use /name or /a/b (letters, digits, _ . -), no trailing /")
        return v


class ClusterConfig(_Strict):
    host: str = ""  # this host's name (default: the hostname)
    underlay: str = ""  # the address other hosts reach this one at
    vxlan_id: int = Field(default=4213, ge=1, le=16777215)
    # seconds without this host's keepalives before the others count its
    # running containers as stopped (their leases stay: sticky)
    lease_ttl: int = Field(default=10, ge=2, le=300)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v and not LABEL.fullmatch(v):
            raise ValueError(f"host {v!r} is not an RFC 1123 label: use a-z, 0-9 and '-', at most 63")
        return v

    @field_validator("underlay")
    @classmethod
    def _underlay(cls, v: str) -> str:
        if v:
            ipaddress.IPv4Address(v)
        return v

    @property
    def host_name(self) -> str:
        if self.host:
            return self.host
        name = os.uname().nodename.split(".")[0].lower()
        if not LABEL.fullmatch(name):
            raise ValueError(f"the hostname {name!r} is not an RFC 1123 label: set [cluster] host")
        return name


def host_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """IPv4 nameservers of the host, but loopback ones (a container, and the
    bridge, cannot use 127.0.0.53 and the like)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            if not addr.is_loopback:
                out.append((str(addr), 53))
    return out


class Config(_Strict):
    state_dir: Path = Path("/var/lib/tether")
    run_dir: Path = Path("/run/tether")
    network: NetworkConfig = NetworkConfig()
    firewall: FirewallConfig = FirewallConfig()
    dns: DnsConfig = DnsConfig()
    store: StoreConfig = StoreConfig()
    cluster: ClusterConfig = ClusterConfig()
    # where this config was read from (None: built-in defaults); passed on to
    # hooks written by `tether oci patch`.
    source: Path | None = None

    @property
    def clustered(self) -> bool:
        """Several hosts share one store ([store] backend = "etcd")."""
        return self.store.backend == "etcd"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "fused.sock"

    @property
    def fs_dir(self) -> Path:
        return self.run_dir / "fs"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "tether.db"


def config_path(explicit: str | None) -> Path | None:
    """--config FILE, else $TETHER_CONFIG, else /etc/tether/tether.toml if present."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TETHER_CONFIG")
    if env:
        return Path(env)
    default = Path(DEFAULT_PATH)
    return default if default.exists() else None


def load(explicit: str | None = None) -> Config:
    path = config_path(explicit)
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}; pass an existing file with --config") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from e
    if "source" in data:
        raise ConfigError(f"config {path}: source: Extra inputs are not permitted")
    try:
        return Config(**data, source=path.resolve())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"config {path}: {where}: {err['msg']}") from e
