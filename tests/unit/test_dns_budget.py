"""Each source address's DNS budget (fused/dns/budget.py): pure, fake time."""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fused.dns.budget import ANSWER, DROP, OTHERS, REFUSE, Budget, Over, report

FLOODER, OTHER = "10.213.0.3", "10.213.0.4"


def send(b: Budget, source: str, rate: float, seconds: float, start: float = 0.0) -> Counter:
    """`rate` queries a second from `source`, evenly, for `seconds`."""
    n = int(rate * seconds)
    return Counter(b.spend(source, start + i / rate) for i in range(n))


def test_a_source_within_its_budget_is_always_answered():
    b = Budget(100)
    assert send(b, OTHER, 99, 30) == Counter({ANSWER: 99 * 30})


def test_a_burst_gets_the_budget_answered_as_many_refused_and_the_rest_dropped():
    b = Budget(100)
    got = [b.spend(FLOODER, 5.0) for _ in range(1000)]  # all in one instant
    assert got == [ANSWER] * 100 + [REFUSE] * 100 + [DROP] * 800


def test_a_steady_flood_is_answered_at_the_budget_refused_at_the_budget_and_dropped_past_it():
    b = Budget(100)
    got = send(b, FLOODER, 10_000, 10)
    # a second's burst, then the rate, for each bucket
    assert 100 * 10 + 100 - 2 <= got[ANSWER] <= 100 * 10 + 100 + 2
    assert 100 * 10 + 100 - 2 <= got[REFUSE] <= 100 * 10 + 100 + 2
    assert got[DROP] == 100_000 - got[ANSWER] - got[REFUSE]


def test_sources_have_budgets_of_their_own():
    b = Budget(100)
    for i in range(2000):  # a flood, and another source asking 50 a second through it
        t = i / 2000 * 10
        b.spend(FLOODER, t)
        b.spend(FLOODER, t)
        if i % 40 == 0:
            assert b.spend(OTHER, t) == ANSWER


def test_tick_names_the_sources_over_their_budget_once_and_counts_again_from_zero():
    b = Budget(10)
    for _ in range(50):
        b.spend(FLOODER, 1.0)
    b.spend(OTHER, 1.0)
    assert b.tick(1.5) == [Over(FLOODER, 10, 30)]
    assert b.tick(1.6) == []
    for _ in range(15):
        b.spend(FLOODER, 1.6)
    # 0.6 s gave each bucket 6 tokens back: 6 answered, 6 refused, 3 dropped
    assert b.tick(2.0) == [Over(FLOODER, 6, 3)]


def test_idle_sources_are_forgotten_at_a_tick_and_come_back_with_full_buckets():
    b = Budget(10)
    b.spend(OTHER, 0.0)
    for _ in range(30):
        b.spend(FLOODER, 0.0)
    b.tick(0.5)
    assert set(b.buckets) == {OTHER, FLOODER}  # not idle for a whole burst yet
    b.tick(2.0)
    assert set(b.buckets) == set()
    assert [b.spend(FLOODER, 2.0) for _ in range(11)] == [ANSWER] * 10 + [REFUSE]


def test_the_table_is_bounded_new_sources_past_it_share_one_bucket():
    b = Budget(5, max_sources=3)
    for i in range(3):
        assert b.spend(f"10.0.0.{i}", 0.0) == ANSWER
    got = [b.spend(f"192.0.2.{i}", 0.0) for i in range(20)]  # e.g. spoofed sources
    assert got == [ANSWER] * 5 + [REFUSE] * 5 + [DROP] * 10
    assert set(b.buckets) == {"10.0.0.0", "10.0.0.1", "10.0.0.2", OTHERS}
    assert b.spend("10.0.0.1", 0.0) == ANSWER  # the known ones keep their own


def test_the_report_is_one_line_naming_the_worst_first():
    line = report([Over("10.0.0.3", 500, 60000), Over("10.0.0.9", 3, 0)], 500, 1.0)
    assert "\n" not in line
    assert line.index("10.0.0.3 refused 500, dropped 60000") < line.index("10.0.0.9 refused 3, dropped 0")
    many = report([Over(f"10.0.0.{i}", 1, 1) for i in range(9)], 500, 1.0, most=5)
    assert "and 4 more source(s)" in many and many.count("refused") == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FLOODER, OTHER, "10.213.0.5"]), st.floats(0, 0.05)), max_size=400),
       st.integers(1, 50))
def test_no_source_ever_gets_more_than_a_burst_plus_its_rate(steps, qps):
    """Whatever the arrivals: answered <= burst + qps * elapsed, the same for
    refused, and every query gets exactly one verdict."""
    b = Budget(qps)
    now, first, verdicts = 0.0, {}, {}
    for source, dt in steps:
        now += dt
        first.setdefault(source, now)
        v = b.spend(source, now)
        verdicts.setdefault(source, Counter())[v] += 1
    for source, got in verdicts.items():
        limit = qps + qps * (now - first[source]) + 1e-6
        assert got[ANSWER] <= limit and got[REFUSE] <= limit
        assert sum(got.values()) == sum(1 for s, _ in steps if s == source)
