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


@pytest.mark.xfail(
    reason="BUG: choose() evicts from every key in `held`, also keys outside `pool` "
    "(e.g. an explicit host port outside port_range, or an address of an old subnet)",
    strict=True,
)
def test_eviction_never_hands_out_a_key_outside_the_pool():
    held = {"10.0.0.2": running("a"), "10.0.0.3": running("b"), "10.0.0.4": running("c"),
            "192.168.7.7": stopped("elsewhere", 1.0)}
    # every key of the pool is held by a running container: the only correct
    # answers are Exhausted or (never) a key of the pool
    try:
        c = choose(POOL, held, "new")
    except Exhausted:
        return
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
    it = address_pool(net)
    assert next(it) == "10.0.0.2"
    assert next(it) == "10.0.0.3"


@pytest.mark.xfail(
    reason="BUG: address_pool/address_pool_size disagree on /31 (1 vs 0) and address_pool raises "
    "TypeError on /32 (network.hosts() returns a list there); unreachable via config (needs /29+)",
    strict=True,
)
@pytest.mark.parametrize("prefix", [31, 32])
def test_address_pool_tiny_networks_are_consistent(prefix):
    net = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    assert len(list(address_pool(net))) == address_pool_size(net)
