"""fused.allocator: sticky, then free, then least recently stopped (DESIGN "Leases")."""
from __future__ import annotations

import ipaddress
import random

import pytest

from fused.allocator import Choice, Exhausted, HeldByRunning, Holder, address_pool, address_pool_size, choose, claim

POOL = ["10.0.0.2", "10.0.0.3", "10.0.0.4"]


def running(name: str) -> Holder:
    return Holder(name, True, None)


def stopped(name: str, at: float) -> Holder:
    return Holder(name, False, at)


# --- choose: sticky ----------------------------------------------------------


def test_sticky_keeps_own_current_key_even_when_others_are_free():
    held = {"10.0.0.3": stopped("db", 5.0)}
    assert choose(POOL, held, "db", current="10.0.0.3") == Choice("10.0.0.3")


def test_sticky_current_not_in_held_is_returned():
    # the name's lease row is gone from `held` but the caller says it holds it
    assert choose(POOL, {}, "db", current="10.0.0.4") == Choice("10.0.0.4")


def test_sticky_with_full_pool_does_not_evict_anyone():
    held = {"10.0.0.2": stopped("a", 1.0), "10.0.0.3": stopped("db", 9.0), "10.0.0.4": running("c")}
    c = choose(POOL, held, "db", current="10.0.0.3")
    assert c.key == "10.0.0.3"
    assert c.evict is None


def test_current_taken_by_someone_else_falls_back_to_free():
    # db was evicted from .2 (now web's); it gets the first free address
    held = {"10.0.0.2": running("web")}
    assert choose(POOL, held, "db", current="10.0.0.2") == Choice("10.0.0.3")


# --- choose: free first ------------------------------------------------------


def test_empty_table_gives_first_key_of_pool():
    assert choose(POOL, {}, "a") == Choice("10.0.0.2")


def test_free_first_in_pool_order_before_any_eviction():
    held = {"10.0.0.2": stopped("old", 0.0), "10.0.0.3": running("b")}
    c = choose(POOL, held, "new")
    assert c == Choice("10.0.0.4")
    assert c.evict is None


def test_free_key_chosen_follows_pool_preference_order():
    held = {"10.0.0.3": running("b")}
    assert choose(["10.0.0.4", "10.0.0.3", "10.0.0.2"], held, "n").key == "10.0.0.4"
    assert choose(["10.0.0.3", "10.0.0.2", "10.0.0.4"], held, "n").key == "10.0.0.2"


def test_pool_can_be_a_generator():
    net = ipaddress.IPv4Network("10.9.0.0/29")
    held = {"10.9.0.2": running("a")}
    assert choose(address_pool(net), held, "b").key == "10.9.0.3"


# --- choose: LRU eviction ----------------------------------------------------


def test_evicts_the_stopped_holder_that_stopped_longest_ago():
    held = {
        "10.0.0.2": stopped("mid", 20.0),
        "10.0.0.3": stopped("oldest", 10.0),
        "10.0.0.4": stopped("newest", 30.0),
    }
    assert choose(POOL, held, "new") == Choice("10.0.0.3", evict="oldest")


def test_never_evicts_a_running_holder_even_if_it_is_older():
    held = {
        "10.0.0.2": running("r1"),
        "10.0.0.3": stopped("s", 100.0),
        "10.0.0.4": running("r2"),
    }
    assert choose(POOL, held, "new") == Choice("10.0.0.3", evict="s")


def test_never_evicts_the_asking_name_itself():
    # "db" holds .2 (stopped, oldest) but asks without current: it must not evict itself
    held = {"10.0.0.2": stopped("db", 1.0), "10.0.0.3": stopped("b", 2.0), "10.0.0.4": running("c")}
    assert choose(POOL, held, "db") == Choice("10.0.0.3", evict="b")


def test_stopped_holder_without_timestamp_counts_as_oldest():
    held = {"10.0.0.2": stopped("s1", 5.0), "10.0.0.3": Holder("s0", False, None), "10.0.0.4": running("c")}
    assert choose(POOL, held, "new") == Choice("10.0.0.3", evict="s0")


def test_ties_are_broken_deterministically_whatever_the_table_order():
    items = [
        ("10.0.0.4", stopped("c", 7.0)),
        ("10.0.0.2", stopped("a", 7.0)),
        ("10.0.0.3", stopped("b", 7.0)),
    ]
    results = set()
    rng = random.Random(1234)
    for _ in range(20):
        rng.shuffle(items)
        results.add(choose(POOL, dict(items), "new"))
    assert len(results) == 1
    (c,) = results
    # the victim is one of the tied holders, and it is the one at the key it names
    assert c.evict == dict(items)[c.key].name
    assert c == Choice("10.0.0.2", evict="a")


def test_tie_on_time_only_among_oldest():
    held = {"10.0.0.2": stopped("x", 3.0), "10.0.0.3": stopped("y", 1.0), "10.0.0.4": stopped("z", 1.0)}
    c = choose(POOL, held, "new")
    assert c.evict in {"y", "z"}
    assert held[c.key].stopped_at == 1.0
    assert choose(POOL, dict(reversed(list(held.items()))), "new") == c


# --- choose: exhausted -------------------------------------------------------


def test_exhausted_when_every_key_is_held_by_a_running_container():
    held = {k: running(f"r{i}") for i, k in enumerate(POOL)}
    with pytest.raises(Exhausted):
        choose(POOL, held, "new")


def test_exhausted_when_only_stopped_holder_is_the_asker_without_current():
    held = {"10.0.0.2": running("a"), "10.0.0.3": running("b"), "10.0.0.4": stopped("me", 1.0)}
    # with current it is sticky
    assert choose(POOL, held, "me", current="10.0.0.4") == Choice("10.0.0.4")
    with pytest.raises(Exhausted):
        choose(POOL, held, "me")


def test_empty_pool_is_exhausted():
    with pytest.raises(Exhausted):
        choose([], {}, "new")


def test_eviction_never_hands_out_a_key_outside_the_pool():
    held = {"10.0.0.2": running("a"), "10.0.0.3": running("b"), "10.0.0.4": running("c"),
            "192.168.7.7": stopped("elsewhere", 1.0)}
    # every key of the pool is held by a running container; the stopped holder
    # outside the pool (an address of an old subnet) is no candidate
    with pytest.raises(Exhausted):
        choose(POOL, held, "new")


def test_eviction_picks_the_lru_holder_inside_the_pool_ignoring_older_ones_outside():
    held = {"10.0.0.2": running("a"), "10.0.0.3": stopped("b", 5.0), "10.0.0.4": stopped("c", 3.0),
            "192.168.7.7": stopped("elsewhere", 1.0)}
    assert choose(POOL, held, "new") == Choice("10.0.0.4", evict="c")


def test_eviction_of_ports_outside_the_port_range_is_never_chosen():
    ports = range(30000, 30002)
    held = {30000: running("a"), 30001: running("b"), 8080: stopped("explicit", 1.0)}
    with pytest.raises(Exhausted):
        choose(ports, held, "new")
    held[30001] = stopped("b", 2.0)
    assert choose(ports, held, "new") == Choice(30001, evict="b")


def test_sticky_current_outside_the_pool_is_not_kept():
    c = choose(POOL, {}, "db", current="192.168.7.7")
    assert c.key in POOL, c


# --- claim -------------------------------------------------------------------


def test_claim_free_key():
    assert claim(8080, {}, "web") == Choice(8080)


def test_claim_own_key_running_or_stopped():
    assert claim(8080, {8080: running("web")}, "web") == Choice(8080)
    assert claim(8080, {8080: stopped("web", 3.0)}, "web") == Choice(8080)


def test_claim_from_stopped_holder_evicts_it():
    assert claim(8080, {8080: stopped("old", 3.0)}, "web") == Choice(8080, evict="old")


def test_claim_from_running_holder_raises_held_by_running():
    with pytest.raises(HeldByRunning) as ei:
        claim(8080, {8080: running("api"), 8081: stopped("x", 1.0)}, "web")
    assert ei.value.key == 8080
    assert ei.value.holder == "api"
    assert "8080" in str(ei.value) and "'api'" in str(ei.value)


def test_claim_ignores_other_keys():
    held = {8081: running("api")}
    assert claim(8080, held, "web") == Choice(8080)


# --- address pools -----------------------------------------------------------


def test_address_pool_of_a_29_skips_network_gateway_broadcast():
    net = ipaddress.IPv4Network("10.213.0.0/29")
    assert list(address_pool(net)) == ["10.213.0.2", "10.213.0.3", "10.213.0.4", "10.213.0.5", "10.213.0.6"]
    assert address_pool_size(net) == 5


@pytest.mark.parametrize("prefix", [16, 22, 24, 27, 28, 29, 30])
def test_address_pool_size_matches_pool(prefix):
    net = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    pool = list(address_pool(net)) if prefix >= 22 else None
    if pool is not None:
        assert len(pool) == address_pool_size(net)
        assert str(net.network_address + 1) not in pool  # the gateway
        assert str(net.broadcast_address) not in pool
        assert len(set(pool)) == len(pool)
    assert address_pool_size(net) == net.num_addresses - 3


def test_address_pool_is_lazy_on_large_networks():
    net = ipaddress.IPv4Network("10.0.0.0/8")
    pool = address_pool(net)
    assert len(pool) == address_pool_size(net) == (1 << 24) - 3
    it = iter(pool)
    assert next(it) == "10.0.0.2"
    assert next(it) == "10.0.0.3"
    # membership is computed, not searched
    assert "10.255.255.254" in pool
    assert "10.255.255.255" not in pool


def test_address_pool_can_be_iterated_twice():
    pool = address_pool(ipaddress.IPv4Network("10.213.0.0/29"))
    assert list(pool) == list(pool) != []


@pytest.mark.parametrize("prefix", [16, 24, 29, 30])
def test_address_pool_membership_matches_iteration(prefix):
    net = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    pool = address_pool(net)
    members = set(pool) if prefix >= 24 else None
    for a in [net.network_address, net.network_address + 1, net.network_address + 2,
              net.broadcast_address - 1, net.broadcast_address, net.broadcast_address + 1,
              net.network_address - 1]:
        expected = str(a) in members if members is not None else (
            int(net.network_address) + 2 <= int(a) <= int(net.broadcast_address) - 1
        )
        assert (str(a) in pool) is expected, a


@pytest.mark.parametrize("key", ["", "not-an-ip", "10.0.0.2 ", "10.0.0.256", None, 3.5, "fd00::2", "10.0.0.2/32"])
def test_address_pool_membership_of_non_addresses_is_false(key):
    assert key not in address_pool(ipaddress.IPv4Network("10.0.0.0/24"))


@pytest.mark.parametrize("prefix", [31, 32])
def test_address_pool_tiny_networks_are_consistent(prefix):
    net = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    pool = address_pool(net)
    assert len(list(pool)) == len(pool) == address_pool_size(net)
    # no room for a container next to the gateway
    assert address_pool_size(net) == 0
    assert "10.0.0.0" not in pool and "10.0.0.1" not in pool
    with pytest.raises(Exhausted):
        choose(pool, {}, "new")


def test_dotted_and_undotted_agree_with_ipaddress():
    import ipaddress

    from fused.allocator import dotted, undotted

    for i in (0, 1, 167772161, 3232235777, 4294967295):
        assert dotted(i) == str(ipaddress.IPv4Address(i)) and undotted(dotted(i)) == i
    for bad in ("1.2.3", "1.2.3.4.5", "1.2.3.256", "01.2.3.4", "a.b.c.d", "", None, 5, "1.2.3.-4"):
        assert undotted(bad) is None, bad
