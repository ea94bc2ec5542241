"""Property and example tests for the numpy fake-quantization reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.rounding import (
    FORMATS,
    bf16_bits_to_fp32,
    fake_quantize,
    ggml_fp32_to_bf16_bits,
    representable,
)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)

F32 = st.one_of(
    hnp.arrays(np.uint32, st.integers(1, 64)).map(lambda u: u.view(np.float32)),
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32)),
)
FINITE_F32 = F32.map(lambda x: np.where(np.isfinite(x), x, np.float32(1.5)))
# q8_0 blocks: finite and small enough (< 8e6) that the f16 block scale amax/127 cannot overflow.
_Q8_ELEM = st.one_of(
    st.floats(-8e6, 8e6, width=32),
    st.integers(0, 2**32 - 1).map(lambda u: np.uint32(u).view(np.float32)).filter(lambda v: abs(v) <= 8e6),
)
Q8 = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=_Q8_ELEM)
SCALES = st.floats(0, 1, width=32)

# precision in bits, log2 of the smallest subnormal, largest finite value
PARAMS = {"bf16": (8, -133, (2 - 2**-7) * 2.0**127), "f16": (11, -24, 65504.0)}


def f32(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def quantum(v: np.ndarray, fmt: str) -> np.ndarray:
    """Spacing of ``fmt`` values in the binade of |v| (float64, exact)."""
    p, emin, _ = PARAMS[fmt]
    return np.ldexp(1.0, np.maximum(np.frexp(np.abs(v))[1] - p, emin))


def assert_rne(x: np.ndarray, q: np.ndarray, fmt: str) -> None:
    """q is x rounded to nearest-even in fmt, judged from the format definition alone."""
    _, _, fmax = PARAMS[fmt]
    x, q = x.astype(np.float64), q.astype(np.float64)
    assert np.array_equal(np.isnan(q), np.isnan(x))
    assert np.array_equal(np.signbit(q)[~np.isnan(x)], np.signbit(x)[~np.isnan(x)])
    inf = np.isinf(x) | (np.abs(x) >= fmax + quantum(np.float64(fmax), fmt) / 2)
    assert (q[inf & ~np.isnan(x)] == np.copysign(np.inf, x[inf & ~np.isnan(x)])).all()
    ok = np.isfinite(x) & ~inf
    x, q, h = x[ok], q[ok], quantum(x[ok], fmt) / 2
    assert (np.abs(q) <= fmax).all() and (np.mod(q, quantum(q, fmt)) == 0).all()  # representable
    err = np.abs(q - x)
    assert (err <= h).all()
    assert (np.mod(q[err == h] / (2 * h[err == h]), 2) == 0).all()  # ties go to even


# ---- bf16: ml_dtypes against the ggml port ----


def assert_bf16_matches_ggml(x: np.ndarray) -> None:
    ours = fake_quantize(x, "bf16")
    port = bf16_bits_to_fp32(ggml_fp32_to_bf16_bits(x))
    nan = np.isnan(x)
    np.testing.assert_array_equal(bits(ours)[~nan], bits(port)[~nan])
    assert np.isnan(ours[nan]).all() and np.isnan(port[nan]).all()
    assert np.array_equal(np.signbit(ours[nan]), np.signbit(x[nan]))
    assert np.array_equal(np.signbit(port[nan]), np.signbit(x[nan]))


@SETTINGS
@given(F32)
def test_bf16_ml_dtypes_matches_ggml_port(x):
    assert_bf16_matches_ggml(x)


def test_bf16_ml_dtypes_matches_ggml_port_all_high_halves():
    high = np.arange(2**16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    assert_bf16_matches_ggml((high[:, None] | low).ravel().view(np.float32))


@pytest.mark.parametrize(
    "src, expected",
    [
        (0x3F808000, 0x3F80),  # tie, 0x3f80 even: down
        (0x3F818000, 0x3F82),  # tie, 0x3f81 odd: up
        (0x3F808001, 0x3F81),  # above the tie: up
        (0x3F807FFF, 0x3F80),  # below the tie: down
        (0x3FFFFFFF, 0x4000),  # carry into the exponent
        (0x7F7F7FFF, 0x7F7F),  # stays at the largest finite bf16
        (0x7F7F8000, 0x7F80),  # tie at the top goes to even = inf
        (0x7F7FFFFF, 0x7F80),  # largest float32 overflows to inf
        (0xFF7FFFFF, 0xFF80),
        (0x7F800000, 0x7F80),  # +inf
        (0xFF800000, 0xFF80),  # -inf
        (0x00000000, 0x0000),  # +0
        (0x80000000, 0x8000),  # -0 keeps its sign
        (0x00010000, 0x0001),  # smallest bf16 subnormal is kept, not flushed
        (0x80010000, 0x8001),
        (0x00018000, 0x0002),  # subnormal tie, odd: up
        (0x00008000, 0x0000),  # half the smallest subnormal: tie to even = 0
        (0x00008001, 0x0001),
        (0x00000001, 0x0000),  # float32 denormal below half of bf16's: 0
    ],
)
def test_bf16_examples(src, expected):
    x = f32(src)
    assert ggml_fp32_to_bf16_bits(x)[0] == expected
    assert bits(fake_quantize(x, "bf16"))[0] == expected << 16


@pytest.mark.parametrize("src", [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF])
def test_bf16_nan_stays_nan_with_sign(src):
    x = f32(src)
    port = ggml_fp32_to_bf16_bits(x)[0]
    assert port == ((src >> 16) | 64)  # quiet bit forced: a truncated 0x7f800001 would read as inf
    for y in (bf16_bits_to_fp32(port), fake_quantize(x, "bf16")):
        assert np.isnan(y).all() and np.signbit(y).all() == bool(src >> 31)


# ---- correct rounding, judged independently of numpy / ml_dtypes casts ----


@SETTINGS
@given(F32, st.sampled_from(["bf16", "f16"]))
def test_round_to_nearest_even(x, fmt):
    assert_rne(x, fake_quantize(x, fmt), fmt)


@pytest.mark.parametrize(
    "value, expected",
    [
        (1 + 2**-11, 1.0),  # tie, even: down
        (1 + 3 * 2**-11, 1 + 2**-9),  # tie, odd: up
        (2 - 2**-12, 2.0),  # carry into the exponent
        (65504.0, 65504.0),
        (float(np.nextafter(np.float32(65520), np.float32(0))), 65504.0),
        (65520.0, np.inf),  # tie at the top goes to even = inf
        (-65520.0, -np.inf),
        (1e30, np.inf),
        (2**-14, 2**-14),  # smallest normal
        (2**-24, 2**-24),  # smallest subnormal is kept
        (2**-25, 0.0),  # tie, even: 0
        (3 * 2**-25, 2**-23),  # tie, odd: up
        (2**-26, 0.0),
        (-(2**-26), -0.0),
        (-0.0, -0.0),
    ],
)
def test_f16_examples(value, expected):
    x = np.array([value], dtype=np.float32)
    np.testing.assert_array_equal(bits(fake_quantize(x, "f16")), bits(np.array([expected], dtype=np.float32)))
    assert_rne(x, fake_quantize(x, "f16"), "f16")


# ---- fake_quantize properties ----


@SETTINGS
@given(F32, st.sampled_from(["bf16", "f16"]))
def test_idempotent_bf16_f16(x, fmt):
    q = fake_quantize(x, fmt)
    assert q.dtype == np.float32 and q.shape == x.shape
    np.testing.assert_array_equal(bits(fake_quantize(q, fmt)), bits(q))
    assert representable(q, fmt).all()


@SETTINGS
@given(Q8)
def test_idempotent_q8_0(x):
    q = fake_quantize(x, "q8_0")
    assert q.dtype == np.float32 and q.shape == x.shape
    np.testing.assert_array_equal(fake_quantize(q, "q8_0"), q)  # by value: a block of -0.0 comes back +0.0


@SETTINGS
@given(st.one_of(F32.map(lambda x: (x, "bf16")), F32.map(lambda x: (x, "f16")), Q8.map(lambda x: (x, "q8_0"))))
def test_scale_endpoints(case):
    x, fmt = case
    y = fake_quantize(x, fmt, 0.0)
    np.testing.assert_array_equal(bits(y), bits(x))
    assert not np.shares_memory(y, x)
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt, 1.0)), bits(fake_quantize(x, fmt)))


@SETTINGS
@given(
    st.one_of(
        FINITE_F32.map(lambda x: (x, "bf16")), FINITE_F32.map(lambda x: (x, "f16")), Q8.map(lambda x: (x, "q8_0"))
    ),
    SCALES,
)
def test_partial_scale_lies_between_x_and_q(case, scale):
    x, fmt = case
    q = fake_quantize(x, fmt)
    y = fake_quantize(x, fmt, scale)
    assert y.dtype == np.float32
    assert (np.minimum(x, q) <= y).all() and (y <= np.maximum(x, q)).all()
    fin = np.isfinite(q)
    x64, q64 = x[fin].astype(np.float64), q[fin].astype(np.float64)
    exact = x64 + np.float64(scale) * (q64 - x64)  # three float32 roundings away at most
    assert (np.abs(y[fin] - exact) <= 2**-21 * np.maximum(np.abs(x64), np.abs(q64)) + 2**-149).all()


@pytest.mark.parametrize("scale, expected", [(0.5, 1 + 2**-8 + 2**-9 + 2**-10), (0.25, 1 + 2**-8 + 2**-9 + 2**-11)])
def test_partial_scale_example(scale, expected):
    x = np.array([1 + 2**-8 + 2**-9], dtype=np.float32)  # bf16 rounds it up to 1 + 2**-7
    assert fake_quantize(x, "bf16")[0] == 1 + 2**-7
    assert fake_quantize(x, "bf16", scale)[0] == expected


# ---- q8_0 ----


def block(*head: float) -> np.ndarray:
    return np.array(list(head) + [0.0] * (32 - len(head)), dtype=np.float32)


def test_q8_0_block_with_unit_scale():
    # amax 127: d = 1 exactly, 127/amax = 1, so q is x rounded half to even
    x = block(127, 0.5, 1.5, 2.5, -2.5, -3.7, 0.49, -127)
    np.testing.assert_array_equal(fake_quantize(x, "q8_0"), block(127, 0, 2, 2, -2, -4, 0, -127))


def test_q8_0_block_with_f16_scale():
    # amax 1: d = 1/127 stored as f16 = 2**-7 + 2**-14; 127/amax = 127 exactly
    d16 = 2**-7 + 2**-14
    x = block(1.0, 0.5, -0.25, 0.1)  # x * 127 = 127, 63.5 (tie, to 64), -31.75, 12.7
    expected = block(127 * d16, 64 * d16, -32 * d16, 13 * d16)
    np.testing.assert_array_equal(fake_quantize(x, "q8_0"), expected)
    assert expected[0] == 0.99993896484375 and expected[1] == 0.50390625


def test_q8_0_uses_127_over_amax_not_reciprocal_of_d():
    # amax 0x3fb4795d: x * (127/amax) = 1.4999999 -> 1, but x * (1/d) = 1.5 -> 2
    amax, x = f32(0x3FB4795D, 0x3C886BDD)
    d16 = np.float32(np.float16(amax / np.float32(127)))
    assert fake_quantize(block(amax, x), "q8_0")[1] == d16


@pytest.mark.parametrize("fill", [0.0, -0.0])
def test_q8_0_zero_block_gives_positive_zeros(fill):
    x = np.full((2, 32), fill, dtype=np.float32)
    np.testing.assert_array_equal(bits(fake_quantize(x, "q8_0")), np.zeros((2, 32), dtype=np.uint32))


@SETTINGS
@given(Q8)
def test_q8_0_blocks_are_f16_scale_times_int8(x):
    y = fake_quantize(x, "q8_0")
    for xb, yb in zip(x.reshape(-1, 32).astype(np.float64), y.reshape(-1, 32).astype(np.float64)):
        s = np.abs(yb).max() / 127  # the block's largest |x| always maps to +-127
        amax = np.abs(xb).max()
        if s == 0:  # f16 scale underflowed: amax / 127 <= 2**-25
            assert (yb == 0).all() and amax <= 127 * 2**-25
            continue
        assert np.float64(np.float16(s)) == s
        k = yb / s
        assert (k == np.rint(k)).all() and np.abs(k).max() == 127
        assert (np.abs(yb - xb) <= s / 2 + amax * 2**-10 + 2**-17).all()  # rint + f16 rounding of d


# ---- representable and bad inputs ----


@pytest.mark.parametrize(
    "fmt, values, expected",
    [
        ("bf16", [1.0, 1 + 2**-7, 1 + 2**-8, np.nan, -np.inf, -0.0, 2.0**-133], [1, 1, 0, 1, 1, 1, 1]),
        ("f16", [2**-24, 2**-26, 65504, 65505, 1 + 2**-10, 1 + 2**-11, np.nan], [1, 0, 1, 0, 1, 0, 1]),
    ],
)
def test_representable(fmt, values, expected):
    np.testing.assert_array_equal(representable(np.array(values, dtype=np.float32), fmt), np.array(expected, bool))


def test_representable_rejects_q8_0():
    with pytest.raises(ValueError, match="q8_0"):
        representable(block(), "q8_0")


@pytest.mark.parametrize("x", [np.zeros(32), np.zeros(32, dtype=np.int32), [0.0] * 32, np.zeros(32, np.float16)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_rejects_non_float32(x, fmt):
    with pytest.raises(TypeError):
        fake_quantize(x, fmt)


def test_rejects_unknown_format():
    with pytest.raises(ValueError, match="q4_0") as err:
        fake_quantize(block(), "q4_0")
    assert all(f in str(err.value) for f in FORMATS)


@pytest.mark.parametrize("scale, text", [(1.5, "1.5"), (-0.1, "-0.1"), (float("nan"), "nan")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_rejects_bad_scale(scale, text, fmt):
    with pytest.raises(ValueError, match=text):
        fake_quantize(block(), fmt, scale)


@pytest.mark.parametrize("x", [np.zeros(31, np.float32), np.zeros((32, 3), np.float32), np.ones((), np.float32)])
def test_q8_0_rejects_bad_shapes(x):
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quantize(x, "q8_0")


def test_q8_0_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        fake_quantize(block(np.nan), "q8_0")
