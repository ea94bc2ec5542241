"""Independent numpy reference for fake quantization (float32 -> format -> float32).

llama.cpp's results are checked against this module, so it is written from the
format definitions (/work/shared/FORMATS.md) and ggml's x86 (AVX2/F16C) code, not
by calling ggml, and it takes float32 only: casting from float64 first would round
twice. The format table and the kernels live in harness.formats; this is the API.
"""

from __future__ import annotations

import numpy as np

from harness.formats import QK8_0, TABLE, Kind, quantize

__all__ = ["FORMATS", "QK8_0", "bf16_bits_to_fp32", "fake_quantize", "ggml_fp32_to_bf16_bits", "representable"]

FORMATS: tuple[str, ...] = tuple(TABLE)  # harness.formats.TABLE: bf16, f16, q8_0, then the scaled/block formats


def _check_f32(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"expected a float32 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    return x


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def fake_quantize(x: np.ndarray, fmt: str, scale: float = 1.0) -> np.ndarray:
    """Round float32 ``x`` to ``fmt`` and back; ``scale`` blends: x + scale * (q(x) - x) in float32.

    A blend with 0 < scale < 1 turns ±inf into NaN (inf - inf), in every format.
    """
    _check_f32(x)
    _check_fmt(fmt)
    if not 0.0 <= scale <= 1.0:  # also rejects NaN
        raise ValueError(f"scale must be in [0, 1], got {scale!r}")
    q = quantize(x, TABLE[fmt])
    if scale == 0:
        return x.copy()
    if scale == 1:
        return q
    with np.errstate(all="ignore"):  # inf - inf is intended
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
    if TABLE[fmt].kind is not Kind.CAST:
        raise ValueError(f"representable() is defined for bf16 and f16 only; {fmt} values depend on their group")
    return (fake_quantize(x, fmt) == x) | np.isnan(x)
