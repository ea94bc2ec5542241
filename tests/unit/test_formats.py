"""The scaled and block formats of harness.formats against the specification /work/shared/FORMATS.md
(cited as §n): every code and every tie of each element type, the specification's test vectors,
saturation, non-finite policy P1, and a slow pure-Python oracle derived a second time from the
specification with exact rational arithmetic (fractions), compared bit for bit on random rows."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import re
from fractions import Fraction as Q

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness.formats import ggml_floorf_log2f
from harness.rounding import FORMATS, fake_quantize

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
F32_MAX = float(np.finfo(np.float32).max)

# ---- the specification, written out again here (not imported from harness.formats) ----

# §0.3: significant bits (mantissa + 1), exponent of the smallest normal (1 - bias), max normal
FLOAT_ELEMS = {
    "e4m3": (4, -6, Q(448)),
    "e5m2": (3, -14, Q(57344)),
    "e3m2": (3, -2, Q(28)),
    "e2m3": (4, 0, Q(15, 2)),
    "e2m1": (2, 0, Q(6)),
}
ML_DTYPES = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
}
EMAX = {"e4m3": 8, "e5m2": 15, "e3m2": 4, "e2m3": 2, "e2m1": 2, "int8": 0}  # §0.3 emax_elem (MXINT8: 0)
# format -> (group, element); "int8" in an MX block means int8 codes times 2^-6 (§2.1)
SPEC = {
    "fp8_e4m3": ("row", "e4m3"),
    "fp8_e5m2": ("row", "e5m2"),
    "fp8_e4m3_tensor": ("tensor", "e4m3"),
    "fp8_e5m2_tensor": ("tensor", "e5m2"),
    "mxfp8_e4m3": ("mx", "e4m3"),
    "mxfp8_e5m2": ("mx", "e5m2"),
    "mxfp6_e2m3": ("mx", "e2m3"),
    "mxfp6_e3m2": ("mx", "e3m2"),
    "mxfp4": ("mx", "e2m1"),
    "mxint8": ("mx", "int8"),
    "nvfp4": ("nvfp4", "e2m1"),
    "int8": ("row", "int8"),
    "mxfp4_ggml": ("ggml", "e2m1"),
}
NEW = tuple(SPEC)
RNE = tuple(f for f in NEW if f != "mxfp4_ggml")  # mxfp4_ggml breaks ties toward zero (§5)
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # ggml kvalues_mxfp4 (§5)
FLT_MAX = Q(2**128 - 2**104)


def test_every_format_is_specified_here():
    assert FORMATS[:3] == ("bf16", "f16", "q8_0") and set(FORMATS[3:]) == set(SPEC)


# ---- exact arithmetic ----


def floor_log2(v: Q) -> int:
    """floor(log2(v)) for a rational v > 0, exactly."""
    e = v.numerator.bit_length() - v.denominator.bit_length()
    return e if Q(2) ** e <= v else e - 1


def round_even(v: Q, p: int, emin: int) -> Q:
    """v >= 0 rounded to p significant bits, exponent >= emin (subnormals below it), ties to even."""
    if v == 0:
        return v
    ulp = Q(2) ** (max(floor_log2(v), emin) - p + 1)
    return round(v / ulp) * ulp  # Fraction.__round__ rounds half to even


def fl(v: Q) -> Q | float:
    """v rounded to float32 (nearest even, subnormals kept); ±inf past the largest finite value."""
    r = round_even(abs(v), 24, -126)
    if r > FLT_MAX:
        return -math.inf if v < 0 else math.inf
    return r if v >= 0 else -r


def cast(v: Q | float, elem: str) -> Q:
    """Q_F of §0.3 for v >= 0: nearest even, then saturate to the max normal (int8: ±127)."""
    if elem == "int8":
        return Q(min(round(v), 127))
    p, emin, vmax = FLOAT_ELEMS[elem]
    return vmax if v == math.inf else min(round_even(v, p, emin), vmax)


def signed(m: Q | float, x: float) -> float:
    """|y| = m with x's sign: every rounding here is symmetric, and a zero keeps the sign of x."""
    return math.copysign(float(m), x)


def amax_of(xs: list[float]) -> Q:
    return max((abs(Q(v)) for v in xs if math.isfinite(v)), default=Q(0))  # P1: non-finite left out


# ---- the oracle: one group at a time, Python floats in, Python floats out ----


def o_scaled(xs: list[float], elem: str) -> list[float]:
    """§1 (FP8) and §4 (INT8)."""
    s = fl(amax_of(xs) / (Q(127) if elem == "int8" else FLOAT_ELEMS[elem][2]))
    if s == 0:
        return list(xs)
    return [signed(fl(cast(fl(abs(Q(v)) / s), elem) * s), v) if math.isfinite(v) else v for v in xs]


def o_mx(xs: list[float], elem: str) -> list[float]:
    """§2.2, with the scaled value v/X kept exact."""
    a = amax_of(xs)
    se = min(max(floor_log2(a) - EMAX[elem] if a else -127, -127), 127)
    x_scale = Q(2) ** se
    ys = []
    for v in xs:
        if not math.isfinite(v):
            ys.append(v)
            continue
        m = abs(Q(v)) / x_scale
        q = Q(min(round(m * 64), 127), 64) if elem == "int8" else cast(m, elem)
        assert fl(q * x_scale) == q * x_scale  # the spec's ldexpf(q, se) is exact
        ys.append(signed(q * x_scale, v))
    return ys


def o_nvfp4(rows: list[list[float]]) -> list[list[float]]:
    """§3.1, one fl() per operation, in the written order."""
    a = amax_of([v for r in rows for v in r])
    s_enc = Q(1) if a == 0 else min(fl(Q(448 * 6) / a), FLT_MAX)
    s_dec = fl(1 / s_enc)
    t = fl(s_enc * fl(Q(1, 6)))
    out = []
    for r in rows:
        ys = []
        for i in range(0, len(r), 16):
            block = r[i : i + 16]
            s_b = cast(fl(amax_of(block) * t), "e4m3")
            den = fl(s_b * s_dec)
            e_b = FLT_MAX if den == 0 else min(fl(1 / den), FLT_MAX)
            for v in block:
                if not math.isfinite(v):
                    ys.append(v)
                    continue
                q = cast(min(fl(abs(Q(v)) * e_b), Q(6)), "e2m1")
                ys.append(signed(fl(fl(q * s_b) * s_dec), v))
        out.append(ys)
    return out


_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_libm.log2f.restype, _libm.log2f.argtypes = ctypes.c_float, [ctypes.c_float]


def o_ggml(xs: list[float]) -> list[float]:
    """§5: quantize_row_mxfp4_ref + dequantize_row_mxfp4 for one block, all 16 kvalues in index order,
    plus the project's pre-pass (non-finite and blocks with amax < 2^-125 pass through)."""
    a = amax_of(xs)
    if a < Q(2) ** -125:
        return list(xs)
    e = math.floor(_libm.log2f(float(a))) - 2 + 127
    d = Q(2) ** (e - 128)
    ys = []
    for v in xs:
        if not math.isfinite(v):
            ys.append(v)
            continue
        errs = []
        for k in KVALUES:
            kd = fl(k * d)
            errs.append(math.inf if isinstance(kd, float) else abs(fl(kd - Q(v))))
        best = min(range(16), key=errs.__getitem__)  # min() keeps the first of equal keys: strict <
        ys.append(float(fl(KVALUES[best] * d)))  # a zero kvalue gives +0.0
    return ys


def oracle(x: np.ndarray, fmt: str) -> np.ndarray:
    group, elem = SPEC[fmt]
    rows = x.reshape(-1, x.shape[-1]).tolist()
    if group == "tensor":
        out = [o_scaled([v for r in rows for v in r], elem)]
    elif group == "row":
        out = [o_scaled(r, elem) for r in rows]
    elif group == "nvfp4":
        out = o_nvfp4(rows)
    else:
        f = o_mx if group == "mx" else lambda xs, _: o_ggml(xs)
        out = [[y for i in range(0, len(r), 32) for y in f(r[i : i + 32], elem)] for r in rows]
    return np.array(out, dtype=np.float32).reshape(x.shape)


# ---- element values, from §0.3, checked against ml_dtypes' decoding ----


def magnitudes(elem: str) -> list[Q]:
    """Every value >= 0 of an element type, ascending (MXINT8's as int8 codes / 64)."""
    if elem == "int8":
        return [Q(k) for k in range(128)]
    p, emin, vmax = FLOAT_ELEMS[elem]
    vals = {Q(0)}
    for e in range(emin, floor_log2(vmax) + 1):
        for m in range(1, 2**p):
            if (e == emin or m >= 2 ** (p - 1)) and m * Q(2) ** (e - p + 1) <= vmax:
                vals.add(m * Q(2) ** (e - p + 1))
    return sorted(vals)


def even_code(m: Q, elem: str) -> bool:
    """Whether the code of magnitude m has an even last bit (its significand is even)."""
    if elem == "int8":
        return m.numerator % 2 == 0
    p, emin, _ = FLOAT_ELEMS[elem]
    return m == 0 or (m / Q(2) ** (max(floor_log2(m), emin) - p + 1)).numerator % 2 == 0


@pytest.mark.parametrize("elem", FLOAT_ELEMS)
def test_spec_values_are_ml_dtypes_values(elem):
    bits = 8 if elem in ("e4m3", "e5m2") else 6 if elem in ("e2m3", "e3m2") else 4
    dec = np.arange(2**bits, dtype=np.uint8).view(ML_DTYPES[elem]).astype(np.float64)
    assert sorted({Q(v) for v in np.abs(dec[np.isfinite(dec)])}) == magnitudes(elem)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def element_values(fmt: str) -> list[Q]:
    """The magnitudes fmt's elements take at scale 1 (MXINT8: code / 64)."""
    elem = SPEC[fmt][1]
    return [m / 64 for m in magnitudes(elem)] if fmt == "mxint8" else magnitudes(elem)


def at_unit_scale(fmt: str, v: np.ndarray) -> np.ndarray:
    """fmt applied to each value of v in a group whose scale is exactly 1, so q(v) = Q_F(v):
    FP8/INT8 groups holding max (s = max/max), MX blocks holding a value of the top binade (se = 0),
    an NVFP4 block holding 6 in an array of amax 2688 (S_enc = 1, s_b = 1), a ggml block holding 6."""
    group = SPEC[fmt][0]
    top = np.float32(float(element_values(fmt)[-1]))
    if group == "tensor":
        return fake_quantize(np.concatenate([[top], v]).astype(np.float32), fmt)[1:]
    width = {"row": 2, "mx": 2, "nvfp4": 16, "ggml": 32}[group]
    x = np.zeros((len(v) + (group == "nvfp4"), width), np.float32)
    x[: len(v), 0], x[: len(v), 1] = top, v
    if group == "nvfp4":
        x[-1, 0] = 2688
    return fake_quantize(x, fmt)[: len(v), 1]


# ---- 1. every code round-trips ----


@pytest.mark.parametrize("fmt", NEW)
def test_every_code_round_trips(fmt):
    mags = element_values(fmt)
    codes = f32(*[float(m) for m in mags], *[-float(m) for m in mags])  # -0.0 included
    y = at_unit_scale(fmt, codes)
    if fmt == "mxfp4_ggml":  # ggml dequantizes both zeros to +0.0
        np.testing.assert_array_equal(y, codes)
        assert not np.signbit(y[codes == 0]).any()
    else:
        np.testing.assert_array_equal(bits(y), bits(codes))


# ---- 2. every tie, and one float32 ulp either side ----


def ties(fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Midpoints of all adjacent value pairs (both signs, across zero), the value each rounds to (to the
    even code; toward zero for mxfp4_ggml) and the neighbours below and above."""
    elem = SPEC[fmt][1]
    mags = element_values(fmt)
    vals = [-m for m in reversed(mags[1:])] + mags
    lo, hi = np.array([float(v) for v in vals[:-1]]), np.array([float(v) for v in vals[1:]])
    if fmt == "mxfp4_ggml":
        to = np.where(np.abs(lo) < np.abs(hi), lo, hi)
    else:
        scale = 64 if fmt == "mxint8" else 1
        to = np.array([a if even_code(abs(a) * scale, elem) else b for a, b in itertools.pairwise(vals)], float)
    return ((lo + hi) / 2).astype(np.float32), to.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)


@pytest.mark.parametrize("fmt", NEW)
def test_every_tie(fmt):
    t, to, lo, hi = ties(fmt)
    assert np.array_equal(t.astype(np.float64), (lo.astype(np.float64) + hi.astype(np.float64)) / 2)  # exact
    y = at_unit_scale(fmt, t)
    expected = np.copysign(to, t)  # a negative tie that rounds to zero gives -0.0 ...
    if fmt == "mxfp4_ggml":
        expected = np.where(to == 0, np.float32(0), expected)  # ... except in ggml, which gives +0.0
    np.testing.assert_array_equal(bits(y), bits(expected))
    below, above = np.nextafter(t, lo), np.nextafter(t, hi)
    for v, near in ((below, lo), (above, hi)):
        expected = np.copysign(near, v)
        if fmt == "mxfp4_ggml":
            expected = np.where(near == 0, np.float32(0), expected)
        np.testing.assert_array_equal(bits(at_unit_scale(fmt, v)), bits(expected))


# ---- 3. the test vectors of §7 (and §3.1's 6 -> 6.0000005) ----

T = 2.0**-10
VECTORS = [
    ("fp8_e4m3_tensor", [448, 17, 19, 1.0625, 1.1875, -T, 3 * T / 2, -300], [448, 16, 20, 1, 1.25, -0.0, 2 * T, -288]),
    ("fp8_e4m3", [448, 17, 19, 1.0625, 1.1875, -T, 3 * T / 2, -300], [448, 16, 20, 1, 1.25, -0.0, 2 * T, -288]),
    ("fp8_e4m3_tensor", [896, 34, 38, 2.125, 2.375, -2 * T, 3 * T, -600], [896, 32, 40, 2, 2.5, -0.0, 4 * T, -576]),
    ("fp8_e5m2", [57344, 1.125, 1.375, 3 * 2.0**-17], [57344, 1, 1.5, 2.0**-15]),
    ("mxfp8_e4m3", [1, 0.06640625, 1.6, -0.75, 2.0**-15, 3 * 2.0**-18], [1, 0.0625, 1.625, -0.75, 2.0**-15, 2.0**-16]),
    ("mxfp8_e4m3", [1.9], [1.75]),
    ("mxfp6_e2m3", [7.5, 0.0625, 0.1875, 1.0625, 7.75, -3.3], [7.5, 0, 0.25, 1, 7.5, -3.25]),
    ("mxfp6_e3m2", [28, 30, 1.125, 1.375, 0.03125, 0.09375], [28, 28, 1, 1.5, 0, 0.125]),
    ("mxint8", [1, 1.99, 0.5078125, 0.5234375, -1.99, -1.9921875], [1, 1.984375, 0.5, 0.53125, -1.984375, -1.984375]),
    ("mxfp4", [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.75, -2.5], [6, 0, 1, 1, 2, 2, 4, 4, -1, -2]),
    ("mxfp4_ggml", [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.75, -2.5], [6, 0, 0.5, 1, 1.5, 2, 3, 4, -0.5, -2]),
    ("mxfp4", [7, 3], [6, 3]),
    ("mxfp4_ggml", [7, 3], [6, 3]),
    ("mxfp4", [float(np.nextafter(np.float32(2**20), np.float32(0)))], [786432]),
    ("mxfp4_ggml", [float(np.nextafter(np.float32(2**20), np.float32(0)))], [1048576]),
    ("nvfp4", [6], [float(np.nextafter(np.float32(6), np.float32(7)))]),  # §3.1: 6 comes back as 6.0000005
]


@pytest.mark.parametrize("fmt, x, expected", VECTORS)
def test_spec_vectors(fmt, x, expected):
    n = 32 if fmt == "mxfp4_ggml" else len(x)  # ggml needs whole blocks: zeros change no amax
    y = fake_quantize(np.pad(f32(*x), (0, n - len(x))), fmt)
    np.testing.assert_array_equal(bits(y[: len(x)]), bits(f32(*expected)))


# ---- 4. saturation ----


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] in ("mx", "ggml")])
def test_saturation_in_the_top_binade(fmt):
    """Values above the max but in its binade keep se = 0 and clamp to the max; 464 and 61440 would be
    NaN / inf through the plain e4m3fn / e5m2 casts (§6)."""
    top = float(element_values(fmt)[-1])
    edge = 2.0 ** (math.floor(math.log2(top)) + 1)
    last = 7.99 if fmt == "mxfp4_ggml" else np.nextafter(np.float32(edge), 0)  # glibc: log2f(8 - ulp) = 3
    v = f32(np.nextafter(np.float32(top), np.float32(edge)), (top + edge) / 2, last)
    v = np.concatenate([v, f32(464, 480, 465, 511.9) if "e4m3" in fmt else f32(61440, 65535) if "e5m2" in fmt else []])
    v = np.concatenate([v, -v]).astype(np.float32)
    np.testing.assert_array_equal(at_unit_scale(fmt, v), np.copysign(np.float32(top), v))


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] in ("row", "tensor")])
def test_saturation_with_a_subnormal_scale(fmt):
    """amax = 1.4 * max * 2^-149 gives s = fl(amax/max) = 2^-149, so amax/s = 1.4 * max must clamp."""
    vmax = float(element_values(fmt)[-1])
    amax = np.float32(1.4 * vmax * 2.0**-149)
    x = f32(amax, -amax, amax / 2)
    y = fake_quantize(x, fmt)
    s = np.float32(2.0**-149)
    assert amax / np.float32(vmax) == s and amax / s > vmax
    np.testing.assert_array_equal(y[:2], f32(vmax * 2.0**-149, -vmax * 2.0**-149))
    np.testing.assert_array_equal(bits(y), bits(oracle(x, fmt)))


def test_nvfp4_saturation():
    """Array amax 2688 gives S_enc = 1; block amax 6.2 gives s_b = e4m3(fl(6.2 * fl(1/6))) = 1 (RNE), so
    fl(x * e_b) = 6.2 exceeds 6 and clamps."""
    x = np.zeros((2, 16), np.float32)
    x[0, 0], x[1, :3] = 2688, (6.2, -6.2, 1)
    np.testing.assert_array_equal(fake_quantize(x, "nvfp4")[1, :3], f32(6, -6, 1))


def within_ulps(v: np.ndarray, k: int = 4) -> np.ndarray:
    """The float32 values within k ulps of each (positive) v."""
    u = v.astype(np.float32).view(np.uint32).astype(np.int64)[:, None] + np.arange(-k, k + 1)
    return u.astype(np.uint32).view(np.float32).ravel()


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] in ("row", "tensor", "nvfp4")])
def test_near_ties_of_the_scaled_value(fmt):
    """Inputs within a few ulps of tie * scale, where the order of the scale operations decides the code
    (x/s versus x*(1/s), §1; the exact chain of §3.1), against the oracle."""
    rng = np.random.default_rng(11)
    t = ties(fmt)[0]
    t = t[t > 0].astype(np.float64)
    vmax = float(element_values(fmt)[-1])
    for _ in range(8):
        amax = np.float32(rng.uniform(1, 2) * 2.0 ** rng.integers(-60, 60))
        if fmt == "nvfp4":  # an array of amax `amax`; blocks of max a_b, each with 15 values near ties
            a_b = amax * np.float32(rng.uniform(1e-3, 1))
            s_b = np.float32(a_b / amax * 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)  # about
            v = within_ulps(rng.choice(t, 15) * amax * s_b / 2688, 3).reshape(-1, 15)
            x = np.concatenate([np.full((len(v), 1), a_b), v], axis=1).reshape(1, -1)
            x = np.concatenate([[[amax] + [0] * 15], x], axis=1)
        else:
            v = within_ulps(rng.choice(t, 20) * amax / vmax)
            x = np.concatenate([[amax], v])[None] * np.where(rng.random(len(v) + 1) < 0.5, -1, 1)
        x = x.astype(np.float32)
        np.testing.assert_array_equal(bits(fake_quantize(x, fmt)), bits(oracle(x, fmt)))


def test_nvfp4_subnormal_and_zero_block_scales():
    """Blocks far below the array's amax: a subnormal E4M3 block scale (allowed, §3.1; torchao's floor at
    2^-6 forbids it, §3.2), or one that underflows to 0, which makes the block ±0."""
    x = np.zeros((3, 16), np.float32)
    x[0, 0] = 1  # S_enc = 2688: s_b = e4m3(a_b * 448)
    x[1] = np.linspace(-1, 1, 16) * 2.0**-15  # a_b * 448 = 0.0137 < 2^-6: subnormal s_b
    x[2] = np.linspace(-1, 1, 16) * 2.0**-20  # a_b * 448 = 4.3e-4 < 2^-10: s_b = 0
    y = fake_quantize(x, "nvfp4")
    np.testing.assert_array_equal(bits(y), bits(oracle(x, "nvfp4")))
    assert (np.abs(y[1]) > 0).sum() >= 12 and (y[2] == 0).all()
    np.testing.assert_array_equal(np.signbit(y[2]), np.signbit(x[2]))


def test_mxfp4_ggml_tiny_blocks():
    """A block whose finite amax is below 2^-125 passes through (ggml's biased exponent would be
    negative); at 2^-125, e = 0 and d = 2^-128, a float32 subnormal."""
    x = np.zeros((2, 32), np.float32)
    x[0, :4] = np.nextafter(np.float32(2.0**-125), 0), -1e-38, 3e-39, np.nan
    x[1, :4] = 2.0**-125, 5 * 2.0**-128, -5 * 2.0**-128, 2.0**-149
    y = fake_quantize(x, "mxfp4_ggml")
    np.testing.assert_array_equal(bits(y[0]), bits(x[0]))
    np.testing.assert_array_equal(y[1, :4], f32(2.0**-125, 4 * 2.0**-128, -4 * 2.0**-128, 0))  # ties toward zero
    np.testing.assert_array_equal(bits(y[1]), bits(oracle(x[1:], "mxfp4_ggml")[0]))


@pytest.mark.parametrize("fmt", NEW)
def test_largest_floats_stay_finite(fmt):
    x = np.tile(f32(F32_MAX, -F32_MAX, 3e38, 1, -0.5, 0), (2, 32 // 6 + 1))[:, :32]
    y = fake_quantize(np.ascontiguousarray(x), fmt)
    if fmt == "int8":  # §4's y = fl(q*s) overflows when amax == FLT_MAX: fl(127 * fl(FLT_MAX/127)) = inf
        assert (np.isinf(y) == (np.abs(x) == F32_MAX)).all()
    else:
        assert np.isfinite(y).all()
    np.testing.assert_array_equal(bits(y), bits(oracle(x, fmt)))


def test_no_overflow_at_the_top_of_float32():
    """The largest 2^16 float32 values as one-element rows (row and MX formats) and the largest 512 as
    whole arrays (NVFP4): fl(max * fl(amax/max)) and the other dequantizations stay finite, except int8
    at FLT_MAX itself."""
    top = (np.uint32(0x7F7FFFFF) - np.arange(2**16, dtype=np.uint32)).view(np.float32)[:, None]
    x = np.concatenate([top, -top])
    for fmt in (f for f in NEW if SPEC[f][0] in ("row", "mx")):
        inf = np.abs(x) == F32_MAX if fmt == "int8" else np.zeros(x.shape, bool)  # fl(127 * fl(FLT_MAX/127))
        np.testing.assert_array_equal(np.isinf(fake_quantize(x, fmt)), inf)
    for v in top[:512]:
        assert np.isfinite(fake_quantize(np.concatenate([v, -v, v / 3]), "nvfp4")).all()


# ---- 5. properties on arbitrary float32 rows ----

SPECIAL = f32(
    0,
    -0.0,
    np.nan,
    np.inf,
    -np.inf,
    F32_MAX,
    -F32_MAX,
    2.0**-149,
    -(2.0**-149),
    2.0**-126,
    2.0**-125,
    -(2.0**-125) * 0.75,
    1e-40,
    448,
    464,
    57344,
    61440,
    6,
    7,
    0.25,
    -0.75,
    1.5,
    2.5,
)
SPECIAL = np.concatenate([SPECIAL, np.array([0x7F800001, 0xFFC00123, 0x7FBFFFFF], np.uint32).view(np.float32)])


def ldexp_quiet(x, k):
    with np.errstate(over="ignore", invalid="ignore"):  # inf is a wanted input; NaN is left as it is
        return np.ldexp(x, np.asarray(k, np.int32))


@st.composite
def rows(draw, lengths=None, arbitrary=True):
    """float32 rows of values in [-2, 2] times 2^(k + o), one k per array and an offset o in [-40, 0] per
    row (blocks of comparable values that round interestingly; rows far below the array's amax), mixed
    (if arbitrary) with any bit pattern and special values (NaN, ±inf, zeros, subnormals, huge)."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 70) if lengths is None else lengths))
    k = draw(st.integers(-150, 127))
    offsets = np.array(draw(st.lists(st.integers(-40, 0), min_size=shape[0], max_size=shape[0])))
    elem = scaled = st.floats(-2, 2, width=32).map(lambda v: (0, int(bits(np.float32(v)))))
    if arbitrary:
        special = st.sampled_from([int(u) for u in SPECIAL.view(np.uint32)])
        elem = st.one_of(st.tuples(st.just(1), st.integers(0, 2**32 - 1) | special), scaled, scaled)
    tagged = draw(st.lists(elem, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    tag = np.array([t for t, _ in tagged]).reshape(shape)
    x = np.array([u for _, u in tagged], np.uint32).view(np.float32).reshape(shape)
    return np.where(tag == 0, ldexp_quiet(x, (k + offsets)[:, None]), x)


def drawn_rows(fmt: str):
    return rows(st.sampled_from([32, 64]) if fmt == "mxfp4_ggml" else None)


def block_exponents(x: np.ndarray, k: int, emax: int) -> np.ndarray:
    """§2.2's unclamped se = floor_log2(amax) - emax of each block (None for amax 0), by exact arithmetic."""
    out = []
    for r in x.tolist():
        for i in range(0, len(r), k):
            a = amax_of(r[i : i + k])
            out.append(floor_log2(a) - emax if a else None)
    return np.array(out, dtype=object)


def check_representable(x: np.ndarray, y: np.ndarray, fmt: str) -> None:
    """Each finite output is a code times its group's scale."""
    group, elem = SPEC[fmt]
    mags = np.array([float(m) for m in element_values(fmt)], np.float32)
    if group in ("row", "tensor"):
        xs = x.reshape(1, -1) if group == "tensor" else x
        for xr, yr in zip(xs, y.reshape(xs.shape)):
            s = np.float32(float(fl(amax_of(xr.tolist()) / Q(float(mags[-1])))))
            if s == 0:
                assert (bits(yr) == bits(xr)).all()
            else:  # y == fl(q*s) for some code q
                with np.errstate(over="ignore"):  # int8's 127 * s overflows at amax = FLT_MAX, as y does
                    assert np.isin(np.abs(yr[np.isfinite(xr)]), mags * s).all()
    elif group in ("mx", "ggml"):
        for xr, yr in zip(x, y):
            for i in range(0, x.shape[-1], 32):
                xb, yb = xr[i : i + 32], yr[i : i + 32]
                a = amax_of(xb.tolist())
                if group == "ggml":
                    if a < Q(2) ** -125:
                        continue
                    se = math.floor(_libm.log2f(float(a))) - 2 + 127 - 127
                else:
                    se = min(max(floor_log2(a) - EMAX[elem] if a else -127, -127), 127)
                assert np.isin(np.abs(yb[np.isfinite(xb)]) / np.float32(2.0**se), mags).all()  # y / 2^se is a code
    else:  # NVFP4: one E4M3 s_b per block with y == fl(fl(q*s_b) * S_dec) for a code q
        a = amax_of(x.ravel().tolist())
        s_dec = np.float32(1 if a == 0 else float(fl(1 / min(fl(Q(2688) / a), FLT_MAX))))
        scales = np.array([float(m) for m in magnitudes("e4m3")], np.float32)
        table = (mags[None, :] * scales[:, None]) * s_dec  # float32 arithmetic, as §3.1
        for xr, yr in zip(x, y):
            for i in range(0, x.shape[-1], 16):
                yb = np.abs(yr[i : i + 16][np.isfinite(xr[i : i + 16])])
                assert (yb[None, :, None] == table[:, None, :]).any(-1).all(-1).any()


@pytest.mark.parametrize("fmt", NEW)
@SETTINGS
@given(data=st.data())
def test_properties_and_oracle(fmt, data):
    x = data.draw(drawn_rows(fmt))
    y = fake_quantize(x, fmt)
    assert y.dtype == np.float32 and y.shape == x.shape
    fin = np.isfinite(x)
    np.testing.assert_array_equal(bits(y[~fin]), bits(x[~fin]))  # P1: non-finite pass through, bits kept
    inf_ok = (fmt == "int8") & (np.abs(np.where(fin, x, 0)).max(axis=-1, keepdims=True) == F32_MAX)
    assert (np.isfinite(y) | ~fin | inf_ok).all()  # finite in, finite out (int8: see the FLT_MAX test)
    y_neg = fake_quantize(-x, fmt)
    same = bits(y_neg) == bits(-y)
    if fmt == "mxfp4_ggml":
        same |= (y == 0) & (y_neg == 0)  # ggml's zeros are all +0.0
    assert (same | np.isnan(x)).all()  # sign symmetry
    check_representable(x, y, fmt)
    np.testing.assert_array_equal(bits(y[fin]), bits(oracle(x, fmt)[fin]))


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] == "mx"])
@SETTINGS
@given(data=st.data(), k=st.integers(-40, 40))
def test_mx_is_invariant_under_powers_of_two(fmt, data, k):
    x = data.draw(rows(arbitrary=False))
    xk = ldexp_quiet(x, k)
    assume(np.isfinite(xk).all() and (np.ldexp(xk, np.int32(-k)) == x).all())  # 2^k x is exact
    emax = EMAX[SPEC[fmt][1]]
    for se in (block_exponents(x, 32, emax), block_exponents(xk, 32, emax)):
        assume(all(s is None or -127 <= s <= 127 for s in se))  # no clamped shared exponent
    np.testing.assert_array_equal(bits(fake_quantize(xk, fmt)), bits(np.ldexp(fake_quantize(x, fmt), np.int32(k))))


# ---- groups: non-finite, zeros, partial blocks, the per-tensor scale ----


@pytest.mark.parametrize("fmt", NEW)
def test_non_finite_are_left_out_of_amax(fmt):
    x = np.tile(f32(1.0, 0.3, -2.5, 0.7), (2, 8))
    x[0, 3], x[1, 2], x[1, 5] = np.nan, np.inf, -np.inf
    y, y0 = fake_quantize(x, fmt), fake_quantize(np.where(np.isfinite(x), x, np.float32(0)), fmt)
    fin = np.isfinite(x)
    np.testing.assert_array_equal(bits(y[fin]), bits(y0[fin]))
    np.testing.assert_array_equal(bits(y[~fin]), bits(x[~fin]))


@pytest.mark.parametrize("fmt", NEW)
def test_all_zero_groups_are_kept(fmt):
    x = np.zeros((2, 64), np.float32)
    x[:, ::3] = -0.0
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt)), bits(x))


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] in ("mx", "nvfp4")])
@pytest.mark.parametrize("n", [1, 17, 33, 70])
def test_a_short_last_block_is_a_zero_padded_block(fmt, n):
    x = (np.random.default_rng(n).standard_normal((3, n)) * 5).astype(np.float32)
    k = 16 if fmt == "nvfp4" else 32
    padded = np.pad(x, ((0, 0), (0, -n % k)))
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt)), bits(fake_quantize(padded, fmt)[:, :n]))


@pytest.mark.parametrize(
    "fmt, per_row", [("fp8_e4m3_tensor", "fp8_e4m3"), ("fp8_e5m2_tensor", "fp8_e5m2"), ("nvfp4", "mxfp4")]
)
def test_a_per_tensor_scale_depends_on_the_batch(fmt, per_row):
    """The same token (row) comes out differently when another token with a larger amax shares the array."""
    token = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    batch = np.stack([token, np.full(16, 100, np.float32)])
    alone, batched = fake_quantize(token[None], fmt)[0], fake_quantize(batch, fmt)[0]
    assert (alone != batched).any()
    np.testing.assert_array_equal(fake_quantize(batch, per_row)[0], fake_quantize(token[None], per_row)[0])


@pytest.mark.parametrize("fmt", NEW)
def test_blend(fmt):
    x = (np.random.default_rng(1).standard_normal((2, 64)) * 3).astype(np.float32)
    q = fake_quantize(x, fmt)
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt, 0.25)), bits(x + (q - x) * np.float32(0.25)))
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt, 0.0)), bits(x))


# ---- 6. bad input ----


def test_unknown_format_lists_the_allowed_names():
    with pytest.raises(ValueError, match="mxfp5") as err:
        fake_quantize(np.zeros(32, np.float32), "mxfp5")
    assert all(f in str(err.value) for f in FORMATS)


@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("x", [np.zeros(32), np.zeros(32, np.float16), np.zeros(32, ml_dtypes.bfloat16), [0.0] * 32])
def test_rejects_non_float32(fmt, x):
    with pytest.raises(TypeError, match="float32"):
        fake_quantize(x, fmt)


@pytest.mark.parametrize("shape", [(31,), (2, 33), (32, 3), ()])
def test_mxfp4_ggml_needs_whole_blocks(shape):
    with pytest.raises(ValueError, match=r"mxfp4_ggml.*multiple of 32.*" + re.escape(str(shape))):
        fake_quantize(np.zeros(shape, np.float32), "mxfp4_ggml")


@pytest.mark.parametrize("fmt", [f for f in NEW if SPEC[f][0] != "tensor"])
def test_row_formats_need_a_row(fmt):
    with pytest.raises(ValueError, match=rf"{fmt}.*\(\)"):
        fake_quantize(np.ones((), np.float32), fmt)


@pytest.mark.parametrize("fmt", NEW)
def test_empty_arrays(fmt):
    for shape in ((0,), (3, 0), (0, 32)):
        assert fake_quantize(np.zeros(shape, np.float32), fmt).shape == shape


@pytest.mark.parametrize("fmt", ["fp8_e4m3_tensor", "fp8_e5m2_tensor"])
def test_tensor_formats_take_a_scalar(fmt):
    vmax = np.float32(448 if "e4m3" in fmt else 57344)
    y = fake_quantize(np.array(-3.3, np.float32), fmt)  # its own amax: q = -max
    assert y.shape == () and y == -(vmax * (np.float32(3.3) / vmax))


# ---- other implementations ----


def test_mxfp4_ggml_matches_gguf_py():
    """gguf-py's numpy port of quantize_row_mxfp4_ref / dequantize_row_mxfp4, on finite blocks whose amax
    is >= 2^-125 (below it the project passes blocks through) and not within 2^7 ulps of a power of two
    (where gguf-py's np.log2 may differ from glibc's log2f, which is off up to 44 ulps below)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.integers(-100, 100, (64, 1)))).astype(np.float32)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1)
    frac = amax.view(np.uint32) & 0x7FFFFF
    assert (amax >= 2.0**-125).all() and ((frac >= 1 << 7) & (frac < (1 << 23) - (1 << 7))).all()
    port = gguf_quants.dequantize(gguf_quants.quantize(x, GGMLQuantizationType.MXFP4), GGMLQuantizationType.MXFP4)
    np.testing.assert_array_equal(bits(fake_quantize(x, "mxfp4_ggml")), bits(port))


@pytest.mark.parametrize(
    "fmt, dtype", [("fp8_e4m3_tensor", ml_dtypes.float8_e4m3fn), ("fp8_e5m2_tensor", ml_dtypes.float8_e5m2)]
)
def test_fp8_at_unit_scale_is_the_ml_dtypes_cast(fmt, dtype):
    """Every float32 whose upper 16 bits are given, in range: fl(x/1) cast by ml_dtypes directly."""
    vmax = float(ml_dtypes.finfo(dtype).max)
    x = ((np.arange(2**16, dtype=np.uint32) << 16) | 0x5A5A).view(np.float32)
    x = np.concatenate([[vmax], x[np.abs(x) <= vmax]]).astype(np.float32)
    np.testing.assert_array_equal(bits(fake_quantize(x, fmt)), bits(x.astype(dtype).astype(np.float32)))


def test_ggml_floorf_log2f_is_glibcs():
    """Near every power of two (where log2f rounds up, §0.2) and at random, against log2f one by one."""
    k = np.arange(-125, 128)
    near = (np.ldexp(1.0, k).astype(np.float32).view(np.uint32)[:, None] + np.arange(-64, 65)).ravel()
    base = np.ldexp(1.0, np.arange(-125, 128, 7)).astype(np.float32).view(np.uint32)[:, None]
    edges = base + np.array([(1 << 13) - 1, 1 << 13, (1 << 23) - (1 << 13) - 1, (1 << 23) - (1 << 13)])  # window
    a = np.concatenate([near, edges.ravel()]).astype(np.uint32).view(np.float32)
    a = a[(a >= 2.0**-125) & np.isfinite(a)]
    a = np.concatenate([a, np.abs(np.random.default_rng(3).standard_normal(5000)).astype(np.float32)])
    glibc = np.array([math.floor(_libm.log2f(float(v))) for v in a])
    assert (glibc != np.frexp(a)[1] - 1).sum() > 100  # not vacuous: log2f does round up there
    np.testing.assert_array_equal(ggml_floorf_log2f(a), glibc)
