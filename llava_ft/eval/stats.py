"""Seeded percentile-bootstrap intervals for benchmark scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int
    """Number of resampled units (questions for circular MMBench, rows otherwise)."""
    n_resamples: int
    seed: int
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Estimate:
        """From `to_dict()` output, possibly inside a larger record (extra keys such as "metric" ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def fmt(self, scale: float = 100.0) -> str:
        return f"{self.value * scale:.2f} [{self.low * scale:.2f}, {self.high * scale:.2f}]"


def bootstrap(
    n: int,
    statistic: Callable[[np.ndarray], float],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """`statistic(indices)` on all units, and its (1-level)/2 .. (1+level)/2 percentiles over resamples.

    Resampling indices (not values) lets one function serve means, F1 and grouped scores alike.
    """
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, n_resamples, seed, level)
    rng = np.random.default_rng(seed)
    # One resample at a time: memory stays O(n) for benchmarks with tens of thousands of rows.
    stats = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_resamples)])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Estimate(float(statistic(np.arange(n))), float(low), float(high), n, n_resamples, seed, level)


def bootstrap_mean(
    values: Sequence[float], *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> Estimate:
    arr = np.asarray(values, dtype=np.float64)
    return bootstrap(
        len(arr), lambda idx: float(arr[idx].mean()), n_resamples=n_resamples, seed=seed, level=level
    )
