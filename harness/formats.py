"""The fake-quantization formats as one table, with their numpy kernels (the independent reference).

Written from the specification /work/shared/FORMATS.md (cited as §n), never from native code: the
native implementation is checked against these kernels bit for bit. Every kernel works in float32
only (a detour through float64 would round twice) and uses ml_dtypes 0.6.0 for element casts as §6
prescribes. Formats added here follow non-finite policy P1 (§0.4): NaN and ±Inf are left out of
every amax and come back unchanged (bits kept); the finite elements are quantized as if they were
absent. bf16, f16 and q8_0 keep their earlier behaviour (plain casts; q8_0 rejects NaN).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import ml_dtypes
import numpy as np

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max
QK8_0 = 32


class Kind(Enum):
    """How a format finds its scale; the kernel follows from it (GGML: one kernel per format)."""

    CAST = "element cast"
    ROW = "per-row scaled"
    TENSOR = "per-tensor scaled"
    MX = "MX block"
    NVFP4 = "NVFP4"
    GGML = "ggml"


@dataclass(frozen=True)
class Element:
    """An element type (§0.3): a float type stored by ml_dtypes, or integer codes times `step`."""

    name: str
    max: float  # largest magnitude, where the casts of scaled formats saturate
    emax: int  # floor(log2(max)): an MX scale puts the block's amax in this binade (§2.2)
    dtype: type | None  # numpy / ml_dtypes storage type; None for integer codes
    step: float = 1.0  # value of integer code 1 (MXINT8: 2^-6)

    def cast(self, v: np.ndarray) -> np.ndarray:
        """Q_F of §0.3: nearest, ties to even, saturating to ±max, sign of zero kept. Overwrites v."""
        lim = F32(self.max)
        if self.dtype is None:
            v *= F32(1 / self.step)  # exact: step is a power of two and |v| is small
            np.rint(v, out=v)
            np.clip(v, -lim / F32(self.step), lim / F32(self.step), out=v)
            v *= F32(self.step)
            return v
        np.clip(v, -lim, lim, out=v)  # mandatory: the e4m3fn / e5m2 casts overflow to NaN / inf (§6)
        return v.astype(self.dtype).astype(np.float32)


BF16 = Element("bf16", float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 127, ml_dtypes.bfloat16)
F16 = Element("f16", 65504.0, 15, np.float16)
E4M3 = Element("e4m3", 448.0, 8, ml_dtypes.float8_e4m3fn)
E5M2 = Element("e5m2", 57344.0, 15, ml_dtypes.float8_e5m2)
E3M2 = Element("e3m2", 28.0, 4, ml_dtypes.float6_e3m2fn)
E2M3 = Element("e2m3", 7.5, 2, ml_dtypes.float6_e2m3fn)
E2M1 = Element("e2m1", 6.0, 2, ml_dtypes.float4_e2m1fn)
INT8 = Element("int8", 127.0, 6, None)
INT8_MX = Element("int8/64", 127 / 64, 0, None, 2.0**-6)  # MXINT8: two's complement, clamped to ±127 (§2.1)


@dataclass(frozen=True)
class Format:
    """One row of the format table."""

    name: str
    kind: Kind
    element: Element
    block: int | None  # elements per block along the row (ggml ne0); None: the scale covers a row or the array
    scale: str  # the scale rule, one line, with its FORMATS.md section
    row_multiple: int | None  # None: any shape; n: at least one dimension, row length a multiple of n
    description: str  # one line for docs

    @property
    def shape(self) -> str:
        """The shapes this format takes, in words."""
        if self.row_multiple is None:
            return "any shape"
        if self.row_multiple == 1:
            return "at least one dimension (rows along the last axis), any row length"
        return f"at least one dimension, last dimension a multiple of {self.row_multiple}"

    def check_shape(self, shape: tuple[int, ...]) -> None:
        m = self.row_multiple
        if m is None:
            return
        if m > 1 and (not shape or shape[-1] % m):
            raise ValueError(f"{self.name} needs a last dimension that is a multiple of {m}, got shape {shape}")
        if not shape:
            raise ValueError(f"{self.name} needs at least one dimension (rows along the last axis), got shape {shape}")


def _fp8_row(e: Element, per: str) -> str:
    return f"FP32 s = amax/{e.max:g} per {per}, not rounded further (§1)"


def _mx_scale(e: Element) -> str:
    return f"E8M0 2^(floor_log2(amax) - {e.emax}) per block, exponent clamped to [-127, 127] (§2.2)"


# fmt: off
_TABLE = (
    Format("bf16", Kind.CAST, BF16, None, "none", None, "bfloat16, nearest even; overflow gives inf, NaN stays NaN"),
    Format("f16", Kind.CAST, F16, None, "none", None, "IEEE half, nearest even; overflow gives inf, NaN stays NaN"),
    Format("q8_0", Kind.GGML, INT8, QK8_0, "f16(amax/127) per block, elements x*(127/amax) (ggml AVX2)", QK8_0,
           "ggml Q8_0 as quantize_row_q8_0 (x86 AVX2) then dequantize_row_q8_0; rejects NaN"),
    Format("fp8_e4m3", Kind.ROW, E4M3, None, _fp8_row(E4M3, "row"), 1, "FP8 E4M3 (OCP fn), dynamic scale per row"),
    Format("fp8_e5m2", Kind.ROW, E5M2, None, _fp8_row(E5M2, "row"), 1, "FP8 E5M2, dynamic scale per row"),
    Format("fp8_e4m3_tensor", Kind.TENSOR, E4M3, None, _fp8_row(E4M3, "array"), None,
           "FP8 E4M3 (OCP fn), one dynamic scale for the whole array"),
    Format("fp8_e5m2_tensor", Kind.TENSOR, E5M2, None, _fp8_row(E5M2, "array"), None,
           "FP8 E5M2, one dynamic scale for the whole array"),
    Format("mxfp8_e4m3", Kind.MX, E4M3, 32, _mx_scale(E4M3), 1, "OCP MX v1.0 MXFP8 with E4M3 elements"),
    Format("mxfp8_e5m2", Kind.MX, E5M2, 32, _mx_scale(E5M2), 1, "OCP MX v1.0 MXFP8 with E5M2 elements"),
    Format("mxfp6_e2m3", Kind.MX, E2M3, 32, _mx_scale(E2M3), 1, "OCP MX v1.0 MXFP6 with E2M3 elements"),
    Format("mxfp6_e3m2", Kind.MX, E3M2, 32, _mx_scale(E3M2), 1, "OCP MX v1.0 MXFP6 with E3M2 elements"),
    Format("mxfp4", Kind.MX, E2M1, 32, _mx_scale(E2M1), 1, "OCP MX v1.0 MXFP4 (E2M1 elements), RNE"),
    Format("mxint8", Kind.MX, INT8_MX, 32, _mx_scale(INT8_MX), 1,
           "OCP MX v1.0 MXINT8: int8 times 2^-6, clamped to +-127"),
    Format("nvfp4", Kind.NVFP4, E2M1, 16,
           "E4M3 block scale (RNE, satfinite) times FP32 1/S_enc, S_enc = 2688/amax of the array (§3.1)", 1,
           "NVIDIA NVFP4, TransformerEngine recipe with a dynamic per-array scale"),
    Format("int8", Kind.ROW, INT8, None, "FP32 s = amax/127 per row (§4)", 1,
           "symmetric INT8 per row (per token), codes clamped to +-127, RNE"),
    Format("mxfp4_ggml", Kind.GGML, E2M1, 32, "E8M0 2^(floorf(log2f(amax)) - 2) per block, glibc log2f (§5)", 32,
           "ggml's own MXFP4: quantize_row_mxfp4_ref then dequantize_row_mxfp4, ties toward zero"),
)
# fmt: on
TABLE: dict[str, Format] = {f.name: f for f in _TABLE}


def quantize(x: np.ndarray, f: Format) -> np.ndarray:
    """q(x): float32 ``x`` rounded to format ``f`` and back (no blend), as a new float32 array."""
    f.check_shape(x.shape)
    with np.errstate(all="ignore"):  # overflow to inf, 0/0 in skipped groups, NaN arithmetic: all intended
        if f.kind is Kind.CAST:
            return x.astype(f.element.dtype).astype(np.float32)
        if f.name == "q8_0":
            return _q8_0(x)
        if x.size == 0:
            return x.copy()
        if x.ndim == 0:  # a scalar (per-tensor formats only): as a one-element array
            return quantize(x.reshape(1), f).reshape(())
        kernel = _mxfp4_ggml if f.kind is Kind.GGML else _KERNELS[f.kind]
        fin = np.isfinite(x)
        if fin.all():
            return kernel(x, f)
        y = kernel(np.where(fin, x, F32(0)), f)  # P1: a zero changes no amax; its output is replaced
        np.copyto(y, x, where=~fin)
        return y


def _q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0 (x86 AVX2 path) then dequantize_row_q8_0, per block of 32."""
    if np.isnan(x).any():
        raise ValueError("q8_0 reference does not model NaN inputs (the AVX2 max is order dependent)")
    b = x.reshape(*x.shape[:-1], x.shape[-1] // QK8_0, QK8_0)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d16 = (amax / np.float32(127)).astype(np.float16)
    iscale = np.where(amax != 0, np.float32(127) / amax, np.float32(0))  # 127/amax, not 1/d
    r = np.rint(b * iscale)
    # _mm256_cvtps_epi32 gives INT32_MIN for NaN or out of range; the packs saturate to int8.
    q = np.where(np.abs(r) < 2.0**31, np.clip(r, -128, 127), -128).astype(np.int8)
    return (d16.astype(np.float32) * q.astype(np.float32)).reshape(x.shape)


def _scaled(x: np.ndarray, f: Format) -> np.ndarray:
    """§1 / §4: s = fl(amax/max) per row or per array; s == 0 gives y = x; else y = fl(Q(fl(x/s)) * s)."""
    amax = np.max(np.abs(x), axis=-1 if f.kind is Kind.ROW else None, keepdims=True)
    s = amax / F32(f.element.max)
    y = f.element.cast(x / s)
    y *= s
    np.copyto(y, x, where=s == 0)  # amax == 0, or amax/max underflowed
    return y


def _blocks(x: np.ndarray, k: int) -> np.ndarray:
    """x as (..., blocks, k); a short last block is padded with zeros, which change no amax (§2.2)."""
    pad = -x.shape[-1] % k
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), np.float32)], axis=-1)
    return x.reshape(*x.shape[:-1], -1, k)


def _unblocks(b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    y = b.reshape(*shape[:-1], -1)
    return y if y.shape[-1] == shape[-1] else np.ascontiguousarray(y[..., : shape[-1]])


def _pow2(e: np.ndarray) -> np.ndarray:
    """2^e as float32 for integer e in [-149, 127], exact (2^-127 is a subnormal)."""
    return np.ldexp(F32(1), e.astype(np.int32))


def _mx(x: np.ndarray, f: Format) -> np.ndarray:
    """§2.2: se = clamp(floor_log2(amax) - emax, -127, 127) per block; y = ldexp(Q(ldexp(x, -se)), se)."""
    b = _blocks(x, f.block)
    amax = np.max(np.abs(b), axis=-1, keepdims=True)
    _, e = np.frexp(amax)  # amax = m * 2^e with m in [0.5, 1): floor_log2 = e - 1, exact for subnormals too
    se = np.clip(np.where(amax > 0, e - 1 - f.element.emax, -127), -127, 127)
    # A product with an exact power of two is one correctly rounded operation, i.e. ldexpf.
    y = f.element.cast(b * _pow2(-se))
    y *= _pow2(se)  # exact: every code times 2^se with se >= -127 is a float32
    return _unblocks(y, x.shape)


def _nvfp4(x: np.ndarray, f: Format) -> np.ndarray:
    """§3.1 in its exact operation order; every arithmetic step is one float32 rounding."""
    amax = np.max(np.abs(x))
    s_enc = F32(1) if amax == 0 else np.minimum(F32(448 * 6) / amax, FLT_MAX)
    s_dec = F32(1) / s_enc
    b = _blocks(x, f.block)
    s_b = E4M3.cast(np.max(np.abs(b), axis=-1, keepdims=True) * (s_enc * (F32(1) / F32(6))))
    e_b = np.minimum(F32(1) / (s_b * s_dec), FLT_MAX)  # s_b == 0: 1/0 = inf -> FLT_MAX
    y = E2M1.cast(b * e_b)  # clamp to ±6 then RNE
    y *= s_b  # exact
    y *= s_dec
    return _unblocks(y, x.shape)


_KERNELS: dict[Kind, Callable[[np.ndarray, Format], np.ndarray]] = {
    Kind.ROW: _scaled,
    Kind.TENSOR: _scaled,
    Kind.MX: _mx,
    Kind.NVFP4: _nvfp4,
}

# ---- mxfp4_ggml (§5) ----

GGML_MIN_AMAX = F32(2.0**-125)  # below it ggml's biased exponent floor(log2(amax)) - 2 + 127 is negative
_KVALUES_POS = (0, 1, 2, 3, 4, 6, 8, 12)  # kvalues_mxfp4[0..7] = 2 * E2M1, in ggml's index order
_NEAR = 1 << 13  # mantissa fields within 2^13 of a power of two go to glibc's log2f
_CHUNK = 4096  # blocks per pass of the kvalue search


@functools.cache
def _log2f() -> Callable[[float], float]:
    name = ctypes.util.find_library("m") or "libm.so.6"
    try:
        fn = ctypes.CDLL(name).log2f
    except (OSError, AttributeError) as err:
        raise RuntimeError(f"mxfp4_ggml needs the C library's log2f (ggml calls it), not found in {name!r}") from err
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def ggml_floorf_log2f(a: np.ndarray) -> np.ndarray:
    """floorf(log2f(a)) as ggml computes it with glibc, for normal float32 a > 0, as int32.

    log2f rounds up to k for some floats a few ulps below 2^k (§0.2), so the exact exponent from the
    bits is wrong there. glibc's log2f is asked for every distinct a whose mantissa field lies within
    2^13 ulps of a power of two; elsewhere |log2(a) - k| > 1.4e-3 for every integer k, far beyond any
    log2f error, so the exponent from the bits is its floor. Measured (docs/log2f_scan.c): over every
    float32 >= 2^-125, glibc 2.36 differs from the exact floor at 7,360 values, all at most 44 ulps
    below a power of two.
    """
    u = a.view(np.uint32)
    out = ((u >> 23) & 0xFF).astype(np.int32) - 127
    frac = u & 0x7FFFFF
    near = (frac < _NEAR) | (frac >= 0x800000 - _NEAR)
    if near.any():
        vals, inv = np.unique(a[near], return_inverse=True)
        log2f = _log2f()
        out[near] = np.array([math.floor(log2f(float(v))) for v in vals], np.int32)[inv]
    return out


def _mxfp4_ggml(x: np.ndarray, f: Format) -> np.ndarray:
    """ggml quantize_row_mxfp4_ref then dequantize_row_mxfp4 (§5), with this project's P1 pre-pass.

    Deviation from ggml, chosen by the project (the native side does the same): a block whose finite
    amax is below 2^-125 (all-zero blocks included) is passed through unchanged, y = x, where ggml's
    uint8 cast of a negative biased exponent is undefined behaviour; non-finite elements are left out
    of amax and passed through (ggml ignores NaN and turns it into +0, and casts Inf to uint8).
    As in ggml, a value that rounds to zero gives +0.0, whatever its sign.
    """
    b = x.reshape(-1, 32)
    a = np.abs(b)
    amax = np.max(a, axis=-1, keepdims=True)
    keep = amax < GGML_MIN_AMAX
    e = ggml_floorf_log2f(np.where(keep, F32(1), amax)) + (127 - 2)  # e = floorf(log2f(amax)) - 2 + 127
    d = _pow2(e - 128)  # GGML_E8M0_TO_FP32_HALF(e): half the E8M0 value, because kvalues are doubled
    best = np.empty_like(a)
    for i in range(0, len(a), _CHUNK):  # chunks of blocks keep the eight passes in cache
        best[i : i + _CHUNK] = _best_kvalue(a[i : i + _CHUNK], d[i : i + _CHUNK])
    y = best * d  # exact
    np.negative(y, out=y, where=(b < 0) & (best != 0))
    np.copyto(y, b, where=keep)
    return y.reshape(x.shape)


def _best_kvalue(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """|kvalues_mxfp4[best_index_mxfp4(x, d)]| for a = |x| (blocks, 32) and d (blocks, 1).

    best_index_mxfp4 is the first i minimizing fabsf(kvalues_mxfp4[i]*d - x) in float32 (strict <).
    For x >= 0 no negative kvalue wins (its error is >= |x|, index 0's); for x < 0 the negative half,
    indices 9..15, repeats the positive half's errors on |x| in the same order after index 0 (index 8
    is a second 0 and never wins). So the search runs on |x| over the non-negative kvalues and the
    caller puts the sign back, except on 0 (index 0 dequantizes to +0).
    """
    d = np.repeat(d, a.shape[-1], axis=-1)  # contiguous operands: 2x faster than broadcasting
    best_err = a.copy()  # index 0: |0*d - x|
    best = np.zeros_like(a)
    err = np.empty_like(a)
    better = np.empty(a.shape, bool)
    for k in _KVALUES_POS[1:]:
        np.multiply(d, F32(k), out=err)  # exact, or inf (never chosen) for k >= 8 when e = 253
        np.subtract(err, a, out=err)
        np.abs(err, out=err)
        np.less(err, best_err, out=better)
        np.minimum(best_err, err, out=best_err)
        np.copyto(best, F32(k), where=better)
    return best
