"""Confidence intervals, p-values and verdicts from per-token (or per-prompt) values.

Neighbouring tokens of one text are correlated, so token series are resampled with the circular
block bootstrap (every position is equally likely to be drawn, unlike moving blocks, which
under-weight both ends), with the block length chosen from the data by Politis and White's rule
(with Patton, Politis and White's correction), from `arch`. The resampling itself is
`circular_block_means`: arch's CircularBlockBootstrap, vectorized, bit for bit (the same draws
from the same generator, the same sums; tests/unit/test_intervals.py checks it against arch), at a
fraction of arch's per-resample Python cost, which was 90 % of assembling the results. Independent samples
(prompts) are resampled independently. A verdict is decided by Holm's step-down procedure over a
model's whole family of comparisons, so the family-wise error rate is FAMILY_LEVEL however many
hypotheses are tested.

These statistics are computed from the cached per-token arrays when results are assembled, not
when llama.cpp runs: changing them re-measures nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
from arch.bootstrap import IndependentSamplesBootstrap, optimal_block_length

RESAMPLES = 20_000
"""Bootstrap resamples: the Monte-Carlo error of a p-value near the smallest Holm threshold
(0.05/6 for six comparisons) is then about 7 % of it, and the verdict tables are identical for
five seeds (tests/experiments/test_matrix.py::test_verdicts_do_not_depend_on_the_seed)."""
CONFIDENCE = 0.95
FAMILY_LEVEL = 0.05
"""Family-wise error rate of each model's verdicts (Holm)."""
SEED = 0


class Verdict(StrEnum):
    """Outcome of testing "difference > 0"."""

    HOLDS = "holds"
    REFUTED = "refuted"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the mean, its percentile CI, the block length used (1: independent
    resampling) and the two-sided bootstrap p-value of "the mean is 0"."""

    estimate: float
    lo: float
    hi: float
    block: int
    p: float

    def triple(self) -> list[float]:
        """[estimate, lo, hi], the form the results file stores."""
        return [self.estimate, self.lo, self.hi]

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _series(x: np.ndarray | Sequence[float], name: str = "x") -> np.ndarray:
    d = np.asarray(x, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D series, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} has non-finite values (first at index {int(np.argmin(np.isfinite(d)))})")
    return d


def block_length(x: np.ndarray) -> int:
    """The Politis–White optimal block length for the circular block bootstrap of mean(x),
    rounded up; 1 for a constant series (no dependence to preserve), at most len(x)."""
    d = _series(x)
    if len(d) < 3 or np.ptp(d) == 0.0:
        return 1
    b = float(optimal_block_length(d)["circular"].iloc[0])
    return int(min(len(d), max(1, math.ceil(b))))


_BATCH = 1 << 22
"""Values gathered per batch of resamples (32 MiB of float64)."""


def _threads() -> int:
    """$FQ_THREADS, else every core: the convention of harness.driver.default_threads (conftest
    gives each xdist worker its share), read here without importing libllama's bindings."""
    return int(os.environ.get("FQ_THREADS", os.cpu_count() or 1))


def circular_block_means(d: np.ndarray, block: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """The means of `resamples` circular block bootstrap resamples of d: what
    `CircularBlockBootstrap(block, d, seed=rng).apply(np.mean, resamples)[:, 0]` returns, bit for bit.
    Like arch, each resample draws its block starts with one `rng.integers(n, size=k)` call (the
    same stream), lays the blocks end to end and keeps the first n values; the means are taken row
    by row over rows whose values are contiguous, which sums in numpy's same pairwise order as
    arch's 1-D np.mean. Blocks are copied whole from a window view with np.take (not value by value
    through an index array), and batches of resamples run on $FQ_THREADS threads (numpy releases the GIL;
    each row is summed alone, so the bits do not depend on the split)."""
    n = len(d)
    k = -(-n // block)  # blocks per resample
    # one call draws what arch's one call per resample draws: the generator's stream does not
    # restart between calls (its spare 32-bit half is kept in the bit generator's state)
    starts = rng.integers(n, size=(resamples, k), dtype=np.int64)
    wrapped = np.concatenate([d, d[:block]])  # wrapped[s + j] == d[(s + j) % n] for s < n, j < block
    windows = np.lib.stride_tricks.sliding_window_view(wrapped, block)  # windows[s] == wrapped[s:s + block]
    means = np.empty(resamples)
    step = max(1, _BATCH // (k * block))

    def batch(first: int) -> None:
        if block == 1:  # np.take on the 1-D series is ~9x faster than on its width-1 window view
            rows = np.take(wrapped, starts[first:first + step])
        else:
            rows = np.take(windows, starts[first:first + step], axis=0).reshape(-1, k * block)[:, :n]
        means[first:first + step] = rows.mean(axis=1)

    firsts = range(0, resamples, step)
    threads = min(_threads(), len(firsts))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(batch, firsts))
    else:
        for first in firsts:
            batch(first)
    return means


def _interval(estimate: float, means: np.ndarray, block: int, confidence: float) -> Interval:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    n = len(means)
    # two-sided percentile p-value with the +1 correction (never 0 from a finite bootstrap)
    below, above = (np.sum(means <= 0.0) + 1) / (n + 1), (np.sum(means >= 0.0) + 1) / (n + 1)
    return Interval(float(estimate), float(lo), float(hi), block, float(min(1.0, 2 * min(below, above))))


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_ci(x: np.ndarray | Sequence[float], *, block: int | None = None, seed: int | Sequence[int] = SEED,
            resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> Interval:
    """CI of mean(x) by the circular block bootstrap; `block` None picks it by Politis–White,
    1 resamples values independently (for independent samples such as prompts)."""
    d = _series(x)
    _check(resamples, confidence)
    b = block_length(d) if block is None else block
    if not 1 <= b <= len(d):
        raise ValueError(f"block must be in [1, {len(d)}], got {b}")
    if np.ptp(d) == 0.0:  # every resample has the same mean: no randomness to draw
        return _interval(float(d[0]), np.full(resamples, d[0]), b, confidence)
    means = circular_block_means(d, b, np.random.default_rng(seed), resamples)
    return _interval(float(d.mean()), means, b, confidence)


def paired_ci(a: np.ndarray, b: np.ndarray, **kw) -> Interval:
    """CI of mean(a) - mean(b) for two series measured on the same tokens: the same blocks are
    drawn from both (resampling their difference), so what the tokens share cancels."""
    x, y = _series(a, "a"), _series(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired series must have equal lengths, got {len(x)} and {len(y)}")
    return mean_ci(x - y, **kw)


def two_sample_ci(a: np.ndarray, b: np.ndarray, *, seed: int | Sequence[int] = SEED, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE) -> Interval:
    """CI of mean(a) - mean(b) for independent samples (e.g. arithmetic vs text prompts),
    each resampled on its own."""
    x, y = _series(a, "a"), _series(b, "b")
    _check(resamples, confidence)
    bs = IndependentSamplesBootstrap(x, y, seed=np.random.default_rng(seed))
    diffs = bs.apply(lambda u, v: np.array([u.mean() - v.mean()]), resamples)[:, 0]
    return _interval(float(x.mean() - y.mean()), diffs, 1, confidence)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone): comparison i is rejected at family-wise
    level alpha exactly when its adjusted p-value is below alpha."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or ((p < 0) | (p > 1) | np.isnan(p)).any():
        raise ValueError(f"p-values must be a 1-D sequence in [0, 1], got {list(pvalues)}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def decide(estimate: float, p_adjusted: float, level: float = FAMILY_LEVEL) -> Verdict:
    """`holds` when the difference is significantly above 0 at the family-wise level, `refuted`
    when significantly below, else `inconclusive`."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not 0.0 <= p_adjusted <= 1.0:
        raise ValueError(f"p-value must be in [0, 1], got {p_adjusted}")
    if p_adjusted >= level or estimate == 0.0:
        return Verdict.INCONCLUSIVE
    return Verdict.HOLDS if estimate > 0 else Verdict.REFUTED


def combine(verdicts: Sequence[str]) -> Verdict:
    """A hypothesis of several comparisons holds when every one holds; one refuted refutes it."""
    if not verdicts:
        raise ValueError("a hypothesis needs at least one comparison")
    if all(v == Verdict.HOLDS for v in verdicts):
        return Verdict.HOLDS
    if any(v == Verdict.REFUTED for v in verdicts):
        return Verdict.REFUTED
    return Verdict.INCONCLUSIVE
