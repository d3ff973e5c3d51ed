"""Benchmarks: each module is a command that prints a table (see README, Speed)."""


def pct(xs: list[float], p: float) -> float:
    """The p-quantile (0..1) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
