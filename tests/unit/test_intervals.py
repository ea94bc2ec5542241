"""harness.intervals: circular block bootstrap intervals, Politis–White block lengths, p-values,
Holm's correction and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from arch.bootstrap import CircularBlockBootstrap

from harness.intervals import (Verdict, block_length, circular_block_means, combine, decide, holm, mean_ci,
                               paired_ci, two_sample_ci)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=100)
FAST = {"resamples": 1000}


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    noise = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = noise[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    return x


# --- the resampling: arch's circular block bootstrap, bit for bit ---------------------------

@SETTINGS
@given(n=st.integers(1, 600), data=st.data(), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-7, 1.0, 3e4]), resamples=st.integers(1, 60))
def test_circular_block_means_equal_arch_bit_for_bit(n, data, seed, scale, resamples):
    """Every series length, every block length from 1 to n (blocks that divide n and blocks that do
    not, one block of the whole series), seeds as mean_ci passes them: the same means as arch."""
    block = data.draw(st.integers(1, n))
    d = np.random.default_rng(seed).exponential(scale, n)
    expected = CircularBlockBootstrap(block, d, seed=np.random.default_rng([seed, 1])).apply(np.mean, resamples)[:, 0]
    got = circular_block_means(d, block, np.random.default_rng([seed, 1]), resamples)
    assert got.view(np.uint64).tolist() == expected.view(np.uint64).tolist()


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_circular_block_means_batches_like_one_pass(monkeypatch, threads):
    """Resamples are gathered in batches to bound memory, and batches run on $FQ_THREADS threads:
    neither a batch boundary nor the thread count changes a bit, and the result is still arch's."""
    d = np.random.default_rng(3).standard_normal(447)
    whole = circular_block_means(d, 7, np.random.default_rng(5), 50)
    monkeypatch.setattr("harness.intervals._BATCH", 448 * 3)  # 3 resamples a batch, the last one short
    monkeypatch.setenv("FQ_THREADS", threads)
    batched = circular_block_means(d, 7, np.random.default_rng(5), 50)
    expected = CircularBlockBootstrap(7, d, seed=np.random.default_rng(5)).apply(np.mean, 50)[:, 0]
    assert batched.tobytes() == whole.tobytes() == expected.tobytes()


# --- block length ------------------------------------------------------------------------------

def test_block_length_follows_the_dependence():
    rng = np.random.default_rng(1)
    iid = block_length(rng.standard_normal(4000))
    dependent = block_length(ar1(rng, 4000, 0.95))
    assert iid <= 3 < 20 <= dependent <= 4000


@pytest.mark.parametrize("x", [np.zeros(100), np.full(50, 2.5), np.array([1.0]), np.array([1.0, 2.0])])
def test_block_length_of_degenerate_series_is_one(x):
    assert block_length(x) == 1


# --- intervals ---------------------------------------------------------------------------------

def test_interval_is_deterministic_per_seed():
    d = np.random.default_rng(2).standard_normal(500)
    assert mean_ci(d, seed=3, **FAST) == mean_ci(d, seed=3, **FAST)
    assert mean_ci(d, seed=3, **FAST) != mean_ci(d, seed=4, **FAST)
    assert mean_ci(d, seed=[3, 1], **FAST) != mean_ci(d, seed=[3, 2], **FAST)


def test_ci_coverage_is_near_nominal():
    """90 % intervals of the mean of skewed iid samples cover the true mean about 90 % of the time."""
    rng = np.random.default_rng(11)
    hits = 0
    for i in range(200):
        ci = mean_ci(rng.exponential(1.0, 400), confidence=0.9, seed=i, resamples=500)
        hits += ci.lo < 1.0 < ci.hi
    assert 0.82 <= hits / 200 <= 0.96


def test_blocks_widen_the_interval_of_dependent_data():
    """AR(1) with phi 0.95: the standard error of the mean is sqrt((1+phi)/(1-phi)) ~ 6.2 times the
    iid one; independent resampling misses that, Politis–White blocks recover most of it."""
    x = ar1(np.random.default_rng(13), 10_000, 0.95)
    iid = mean_ci(x, block=1, **FAST)
    blocked = mean_ci(x, **FAST)
    assert blocked.block > 20
    assert (blocked.hi - blocked.lo) > 3 * (iid.hi - iid.lo)


def test_ci_width_shrinks_with_n():
    rng = np.random.default_rng(12)
    widths = [(lambda c: c.hi - c.lo)(mean_ci(rng.standard_normal(n), **FAST)) for n in (100, 1_000, 10_000)]
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_p_value_and_interval_agree():
    rng = np.random.default_rng(5)
    clear = mean_ci(rng.normal(0.5, 1.0, 2000), **FAST)
    assert clear.lo > 0 and clear.p < 0.01
    null = mean_ci(rng.normal(0.0, 1.0, 2000), **FAST)
    assert null.lo < 0 < null.hi and null.p > 0.05


def test_constant_zero_series_has_p_one():
    ci = mean_ci(np.zeros(300), **FAST)
    assert (ci.estimate, ci.lo, ci.hi, ci.p, ci.block) == (0.0, 0.0, 0.0, 1.0, 1)


def test_pairing_removes_what_the_tokens_share():
    """Two series sharing a large per-token component: the paired interval of their difference
    is far narrower than resampling them independently, and centred on mean(a) - mean(b)."""
    rng = np.random.default_rng(9)
    shared = rng.exponential(1.0, 3000)
    a = shared + rng.normal(0.02, 0.05, 3000)
    b = shared + rng.normal(0.0, 0.05, 3000)
    paired = paired_ci(a, b, **FAST)
    independent = two_sample_ci(a, b, **FAST)
    assert paired.estimate == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert paired.lo > 0 and independent.lo < 0 < independent.hi
    assert (paired.hi - paired.lo) < (independent.hi - independent.lo) / 5


def test_two_sample_detects_a_difference_of_independent_samples():
    rng = np.random.default_rng(10)
    ci = two_sample_ci(rng.normal(1.0, 1.0, 150), rng.normal(0.5, 1.0, 120), **FAST)
    assert ci.block == 1 and ci.lo > 0 and ci.p < 0.01


@pytest.mark.parametrize(("kw", "message"), [
    ({"block": 0}, "block must be in"), ({"block": 11}, "block must be in"), ({"resamples": 0}, "resamples"),
    ({"confidence": 1.0}, "confidence"), ({"confidence": 0.0}, "confidence")])
def test_bad_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        mean_ci(np.arange(10.0) + np.array([0, 1] * 5), **kw)


def test_bad_data_are_named():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        mean_ci(np.array([]))
    with pytest.raises(ValueError, match="non-finite values .first at index 2"):
        mean_ci(np.array([1.0, 2.0, np.nan]))
    with pytest.raises(ValueError, match="equal lengths, got 3 and 4"):
        paired_ci(np.zeros(3), np.zeros(4))


# --- Holm, verdicts ------------------------------------------------------------------------------

def test_holm_hand_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


@SETTINGS
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_matches_statsmodels(p):
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist(), abs=1e-12)


@pytest.mark.parametrize("p", [[1.5], [-0.1], [float("nan")]])
def test_holm_rejects_bad_p_values(p):
    with pytest.raises(ValueError, match="p-values must be"):
        holm(p)


@pytest.mark.parametrize(("estimate", "p", "verdict"), [
    (0.1, 0.001, "holds"), (-0.1, 0.001, "refuted"), (0.1, 0.05, "inconclusive"), (-0.1, 0.2, "inconclusive"),
    (0.0, 0.0, "inconclusive")])
def test_decide_table(estimate, p, verdict):
    got = decide(estimate, p)
    assert got == verdict and isinstance(got, Verdict)


def test_decide_rejects_bad_values():
    with pytest.raises(ValueError, match="p-value must be in"):
        decide(1.0, 1.5)
    with pytest.raises(ValueError, match="level must be in"):
        decide(1.0, 0.01, level=0.0)


@pytest.mark.parametrize(("parts", "verdict"), [
    (["holds"], "holds"), (["holds", "holds"], "holds"), (["holds", "refuted"], "refuted"),
    (["holds", "inconclusive"], "inconclusive"), (["inconclusive", "refuted"], "refuted")])
def test_combine(parts, verdict):
    assert combine(parts) == verdict


def test_combine_needs_a_comparison():
    with pytest.raises(ValueError, match="at least one comparison"):
        combine([])
