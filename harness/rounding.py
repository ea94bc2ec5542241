"""Independent numpy reference for fake quantization (float32 -> format -> float32).

llama.cpp's results are checked against this module, so it is written from the
format definitions and ggml's x86 (AVX2/F16C) code, not by calling ggml, and it
takes float32 only: casting from float64 first would round twice.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FORMATS: tuple[str, ...] = ("bf16", "f16", "q8_0")
QK8_0 = 32


def _check_f32(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"expected a float32 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    return x


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0 (x86 AVX2 path) then dequantize_row_q8_0, per block of 32."""
    if x.ndim == 0 or x.shape[-1] % QK8_0:
        raise ValueError(f"q8_0 needs a last dimension that is a multiple of {QK8_0}, got shape {x.shape}")
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


def fake_quantize(x: np.ndarray, fmt: str, scale: float = 1.0) -> np.ndarray:
    """Round float32 ``x`` to ``fmt`` and back; ``scale`` blends: x + scale * (q(x) - x) in float32."""
    _check_f32(x)
    _check_fmt(fmt)
    if not 0.0 <= scale <= 1.0:  # also rejects NaN
        raise ValueError(f"scale must be in [0, 1], got {scale!r}")
    with np.errstate(all="ignore"):  # overflow to inf and NaN/inf arithmetic are intended
        if fmt == "bf16":
            q = x.astype(ml_dtypes.bfloat16).astype(np.float32)
        elif fmt == "f16":
            q = x.astype(np.float16).astype(np.float32)
        else:
            q = _q8_0(x)
        if scale == 0:
            return x.copy()
        if scale == 1:
            return q
        return x + (q - x) * np.float32(scale)


def ggml_fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Bit-exact port of ggml_compute_fp32_to_bf16 (ggml-impl.h): round to nearest even, NaN quieted."""
    u = _check_f32(x).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16  # uint32 arithmetic wraps as in C
    return np.where(nan, (u >> 16) | 64, rounded).astype(np.uint16)


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def representable(x: np.ndarray, fmt: str) -> np.ndarray:
    """Mask of values that ``fmt`` holds exactly (NaN counts); only bf16 and f16."""
    _check_fmt(fmt)
    if fmt == "q8_0":
        raise ValueError("representable() is defined for bf16 and f16 only; q8_0 values depend on their block")
    return (fake_quantize(x, fmt) == x) | np.isnan(x)
