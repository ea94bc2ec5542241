"""Unit tests for harness.metrics: token statistics, summaries, generation comparison."""

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.metrics import TokenStats, generation_match, summarize, token_stats

SETTINGS = settings(derandomize=True, deadline=None, max_examples=200)


def random_logits(rng, n, v, scale=3.0):
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


def reference_stats(base, test, targets):
    """Direct float64 computation, one row at a time, written differently from the module."""
    kld, nll_b, nll_t, dp = [], [], [], []
    for b, t, y in zip(base.astype(np.float64), test.astype(np.float64), targets):
        p = np.exp(b) / np.exp(b).sum()
        q = np.exp(t) / np.exp(t).sum()
        kld.append(float(np.sum(p * np.log(p / q))))
        nll_b.append(-math.log(p[y]))
        nll_t.append(-math.log(q[y]))
        dp.append(q[y] - p[y])
    return np.array(kld), np.array(nll_b), np.array(nll_t), np.array(dp)


logit_pairs = st.tuples(st.integers(1, 6), st.integers(2, 12)).flatmap(
    lambda shape: st.tuples(
        hnp.arrays(np.float32, shape, elements=st.floats(-30, 30, width=32)),
        hnp.arrays(np.float32, shape, elements=st.floats(-30, 30, width=32)),
        hnp.arrays(np.int64, shape[0], elements=st.integers(0, shape[1] - 1)),
    )
)


# --- token_stats -----------------------------------------------------------------------


def test_identical_logits_give_exactly_zero_kld_and_full_agreement():
    rng = np.random.default_rng(1)
    logits = random_logits(rng, 40, 50)
    targets = rng.integers(0, 50, 40)
    s = token_stats(logits, logits.copy(), targets)
    assert np.all(s.kld == 0.0)
    assert s.top1.dtype == bool and s.top1.all()
    assert np.array_equal(s.nll_base, s.nll_test)
    assert np.all(s.dp == 0.0)


def test_matches_direct_float64_computation():
    rng = np.random.default_rng(2)
    base = random_logits(rng, 30, 20)
    test = base + random_logits(rng, 30, 20, scale=0.5)
    targets = rng.integers(0, 20, 30)
    s = token_stats(base, test, targets)
    kld, nll_b, nll_t, dp = reference_stats(base, test, targets)
    for got, want in [(s.kld, kld), (s.nll_base, nll_b), (s.nll_test, nll_t), (s.dp, dp)]:
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    assert np.array_equal(s.top1, base.argmax(1) == test.argmax(1))
    assert 0 < s.top1.sum() < 30  # the comparison is not vacuous


def test_hand_example_two_token_vocab():
    base = np.array([[0.0, 0.0]], dtype=np.float32)
    test = np.array([[0.0, 1.0]], dtype=np.float32)
    s = token_stats(base, test, np.array([0]))
    q0, q1 = 1 / (math.e + 1), math.e / (math.e + 1)
    assert s.kld[0] == pytest.approx(0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1), rel=1e-14)
    assert s.nll_base[0] == pytest.approx(math.log(2), rel=1e-14)
    assert s.nll_test[0] == pytest.approx(math.log(math.e + 1), rel=1e-14)
    assert s.dp[0] == pytest.approx(q0 - 0.5, rel=1e-12)
    assert not s.top1[0]  # base tie resolves to index 0, test argmax is 1


def test_top1_ties_resolve_to_first_index():
    base = np.array([[2.0, 2.0, 1.0], [1.0, 3.0, 3.0]], dtype=np.float32)
    test = np.array([[2.0, 1.5, 2.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    s = token_stats(base, test, np.array([0, 0]))
    assert s.top1.tolist() == [True, False]


@SETTINGS
@given(logit_pairs)
def test_kld_is_nonnegative(data):
    base, test, targets = data
    s = token_stats(base, test, targets)
    assert np.all(np.isfinite(s.kld))
    assert np.all(s.kld >= -1e-12)  # only float64 rounding may dip below zero
    assert np.all((s.nll_base >= 0) & (s.nll_test >= 0))
    assert np.all(np.abs(s.dp) <= 1)


@SETTINGS
@given(logit_pairs, st.floats(-50, 50))
def test_kld_invariant_to_row_constant(data, c):
    base, test, targets = data
    s0 = token_stats(base, test, targets)
    shifted = (test.astype(np.float64) + c).astype(np.float32)
    s1 = token_stats(base, shifted, targets)
    # float32 rounding of the shifted logits perturbs them by <= ~4e-6 each
    np.testing.assert_allclose(s1.kld, s0.kld, atol=2e-5)
    np.testing.assert_allclose(s1.nll_test, s0.nll_test, atol=2e-5)


def test_kld_exactly_invariant_to_exact_row_shift():
    rng = np.random.default_rng(3)
    # small dyadic values: adding an integer is exact in float32
    base = (rng.integers(-256, 256, (8, 16)) / 32).astype(np.float32)
    test = (rng.integers(-256, 256, (8, 16)) / 32).astype(np.float32)
    targets = rng.integers(0, 16, 8)
    shifts = rng.integers(-100, 100, (8, 1)).astype(np.float32)
    s0 = token_stats(base, test, targets)
    s1 = token_stats(base + shifts, test - 2 * shifts, targets)
    for f in ("kld", "top1", "nll_base", "nll_test", "dp"):
        assert np.array_equal(getattr(s0, f), getattr(s1, f)), f


def test_uniform_logits_have_perplexity_n_vocab():
    n, v = 64, 1000
    logits = np.full((n, v), 1.25, dtype=np.float32)
    targets = np.arange(n) % v
    summary = summarize(token_stats(logits, logits, targets)).to_json()
    assert summary["ppl_base"] == pytest.approx(v, rel=1e-12)
    assert summary["ppl_test"] == pytest.approx(v, rel=1e-12)
    assert summary["ppl_ratio"] == 1.0 and summary["kld_max"] == 0.0


@SETTINGS
@given(st.integers(1, 40), st.integers(2, 70), st.integers(1, 41), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_bits_do_not_depend_on_blocks_or_threads(n, v, block_rows, threads, seed):
    """Every row is computed alone: any blocking (a lone last row included, which np.einsum would
    sum in another order) and any thread split give the one-block bits."""
    rng = np.random.default_rng(seed)
    base = random_logits(rng, n, v)
    test = base + random_logits(rng, n, v, scale=0.3)
    targets = rng.integers(0, v, n)
    one_shot = token_stats(base, test, targets, block_rows=max(2, n))
    blocked = token_stats(base, test, targets, block_rows=block_rows, threads=threads)
    for f in ("kld", "top1", "nll_base", "nll_test", "dp"):
        assert np.array_equal(getattr(one_shot, f), getattr(blocked, f)), f


def test_bits_do_not_depend_on_blocks_at_vocabulary_size():
    """The same at SmolLM2's vocabulary size, where numpy's loops take their vectorized paths."""
    rng = np.random.default_rng(7)
    n, v = 9, 49_152
    base = random_logits(rng, n, v)
    test = base + random_logits(rng, n, v, scale=0.01)
    targets = rng.integers(0, v, n)
    one_shot = token_stats(base, test, targets, block_rows=n)
    for block_rows, threads in [(1, 1), (2, 2), (4, 3), (16, 1)]:
        blocked = token_stats(base, test, targets, block_rows=block_rows, threads=threads)
        assert np.array_equal(one_shot.kld, blocked.kld) and np.array_equal(one_shot.dp, blocked.dp)


def test_blocked_float64_temporaries_stay_bounded():
    rng = np.random.default_rng(5)
    n, v = 1024, 2048  # one-shot float64 copy of one side alone would be 16 MiB
    base = random_logits(rng, n, v)
    test = random_logits(rng, n, v)
    targets = rng.integers(0, v, n)
    tracemalloc.start()
    try:
        token_stats(base, test, targets, block_rows=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20


def test_concat_preserves_order_and_handles_empty():
    rng = np.random.default_rng(6)
    base, test = random_logits(rng, 10, 7), random_logits(rng, 10, 7)
    targets = rng.integers(0, 7, 10)
    whole = token_stats(base, test, targets)
    parts = [token_stats(base[i : i + 4], test[i : i + 4], targets[i : i + 4]) for i in range(0, 10, 4)]
    joined = TokenStats.concat(parts)
    assert np.array_equal(joined.kld, whole.kld) and np.array_equal(joined.dp, whole.dp)
    empty = TokenStats.concat([])
    assert len(empty) == 0 and empty.top1.dtype == bool


@pytest.mark.parametrize(
    "base_shape, test_shape, targets",
    [
        ((3, 4), (3, 5), [0, 1, 2]),
        ((3, 4), (3, 4), [0, 1]),
        ((3, 4), (3, 4), [0, 1, 4]),
        ((3, 4), (3, 4), [0, -1, 2]),
        ((3, 4), (3, 4), [0.0, 1.0, 2.0]),
    ],
)
def test_rejects_bad_input(base_shape, test_shape, targets):
    with pytest.raises(ValueError):
        token_stats(np.zeros(base_shape, np.float32), np.zeros(test_shape, np.float32), np.array(targets))


@pytest.mark.parametrize("option", [{"block_rows": 0}, {"threads": 0}])
def test_rejects_bad_options(option):
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=f"{next(iter(option))} must be >= 1"):
        token_stats(logits, logits, np.array([0, 1]), **option)


@pytest.mark.parametrize("threads", [1, 2])
def test_rejects_non_finite_logits(threads):
    logits = np.zeros((6, 3), np.float32)
    bad = logits.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite logits in rows 4\.\.5"):
        token_stats(logits, bad, np.zeros(6, dtype=np.int64), threads=threads)



@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["base", "test"])
def test_refuses_exactly_the_blocks_with_a_non_finite_logit(value, side):
    """Finiteness is read from the maxima and the KLDs, not checked value by value: every position
    of every row, on either side, with a finite row beside it that puts a probability of exactly 0
    (exp underflow) under some logits, so 0 * inf cases are covered too."""
    rows, v = 3, 5
    base = np.array([[0, -800, 1, 2, -1], [3, 3, -1e30, 0, 1], [-2, -2, -2, -2, -2]], np.float32)
    test = base + np.float32(0.25)
    targets = np.zeros(rows, dtype=np.int64)
    for block_rows in (1, 2):
        assert len(token_stats(base, test, targets, block_rows=block_rows)) == rows
        for i in range(rows):
            for j in range(v):
                b, t = base.copy(), test.copy()
                (b if side == "base" else t)[i, j] = value
                first = i // block_rows * block_rows
                last = min(first + block_rows, rows) - 1
                with pytest.raises(ValueError, match=rf"non-finite logits in rows {first}\.\.{last}$"):
                    token_stats(b, t, targets, block_rows=block_rows)


@SETTINGS
@given(st.tuples(st.integers(1, 4), st.integers(2, 9)).flatmap(lambda shape: st.tuples(
    hnp.arrays(np.float32, shape, elements=st.floats(width=32)),
    hnp.arrays(np.float32, shape, elements=st.floats(width=32)))))
def test_non_finite_is_refused_if_and_only_if_present(pair):
    """Any float32 values, extremes and non-finite ones included."""
    base, test = pair
    targets = np.zeros(len(base), dtype=np.int64)
    if np.isfinite(base).all() and np.isfinite(test).all():
        assert np.isfinite(token_stats(base, test, targets).kld).all()
    else:
        with pytest.raises(ValueError, match="non-finite logits"):
            token_stats(base, test, targets)

# --- summarize ---------------------------------------------------------------------------


def test_summarize_hand_example():
    stats = TokenStats(
        kld=np.array([0.0, 1.0, 2.0, 3.0, 4.0]),
        top1=np.array([True, True, False, True, False]),
        nll_base=np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
        nll_test=np.array([1.0, 2.0, 1.0, 2.0, 1.5]),
        dp=np.array([0.1, -0.2, 0.0, 0.3, -0.2]),
    )
    s = summarize(stats).to_json()
    expected = {
        "n_tokens": 5,
        "kld_mean": 2.0,
        "kld_max": 4.0,
        "kld_p99_9": 3.996,
        "kld_p99": 3.96,
        "kld_p95": 3.8,
        "kld_p90": 3.6,
        "kld_median": 2.0,
        "top1_agreement": 0.6,
        "ppl_base": math.e,
        "ppl_test": math.exp(1.5),
        "ln_ppl_ratio": 0.5,
        "ppl_ratio": math.exp(0.5),
        "dp_mean": 0.0,
        "dp_rms": math.sqrt(0.18 / 5),
    }
    assert set(s) == set(expected)
    for key, want in expected.items():
        assert s[key] == pytest.approx(want, rel=1e-12, abs=1e-15), key
    assert type(s["n_tokens"]) is int
    assert all(type(v) is float for k, v in s.items() if k != "n_tokens")


def test_summarize_rejects_empty():
    with pytest.raises(ValueError):
        summarize(TokenStats.concat([]))


# --- generation_match -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, test, first, rate",
    [
        ([], [], None, 1.0),
        ([1, 2, 3], [1, 2, 3], None, 1.0),
        ([1, 2, 3], [1, 9, 3], 1, 2 / 3),
        ([1, 2, 3], [4, 5, 6], 0, 0.0),
        ([1, 2, 3, 4], [1, 2], 2, 0.5),
        ([], [7], 0, 0.0),
        ((5, 6), [5, 6], None, 1.0),
    ],
)
def test_generation_match(base, test, first, rate):
    got = generation_match(base, test)
    assert got["first_divergence"] == first
    assert got["match_rate"] == pytest.approx(rate)
    assert generation_match(test, base) == got
