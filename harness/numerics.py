"""Per-layer numerics of one fake-quantized run against the baseline: how far each layer's
`ffn_out-N` and `l_out-N` moved, and what the rounding did to the `ffn_norm` activations.

A pure function of two captures (tensor name -> float32 array, as harness.reference.Capture
records them), so it is tested without llama.cpp.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

HIST_BINS = 80
RESIDUAL_NAMES = ("ffn_out", "l_out")


def _pair(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, ...]:
    for side, tensors in (("reference", reference), ("test", test)):
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from the {side} capture")
    x0, x = reference[name].astype(np.float64), test[name].astype(np.float64)
    if x0.shape != x.shape or x0.ndim != 2:
        raise ValueError(f"tensor {name!r}: shapes {x0.shape} (reference) and {x.shape} (test) must be equal 2-D")
    return x0, x


def relative_error(x0: np.ndarray, x: np.ndarray) -> float:
    """‖x − x₀‖ / ‖x₀‖ over the whole tensor; 0 for two all-zero tensors."""
    ref = float(np.linalg.norm(x0))
    diff = float(np.linalg.norm(x - x0))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def mean_cosine(x0: np.ndarray, x: np.ndarray) -> float:
    """Mean over rows (token positions) of the cosine similarity of x and x₀; a zero row
    counts as 1 against a zero row and 0 against anything else."""
    num = (x * x0).sum(axis=-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(x0, axis=-1)
    both_zero = (np.linalg.norm(x, axis=-1) == 0) & (np.linalg.norm(x0, axis=-1) == 0)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.clip(cos, -1.0, 1.0).mean())


def rounding_stats(raw: np.ndarray, rounded: np.ndarray, histogram: bool) -> dict:
    """What the rounding did to one layer's ffn_norm output (raw: before, rounded: after)."""
    if raw.shape != rounded.shape:
        raise ValueError(f"raw {raw.shape} and rounded {rounded.shape} ffn_norm tensors differ in shape")
    mag = np.abs(raw.astype(np.float64))
    entry = {"changed_fraction": float(np.mean(raw != rounded)), "max_abs": float(mag.max()),
             "p50_abs": float(np.percentile(mag, 50)), "p99_abs": float(np.percentile(mag, 99)),
             "p99_9_abs": float(np.percentile(mag, 99.9)),
             "max_rel_change": float(np.max(np.abs(rounded.astype(np.float64) - raw) / np.maximum(mag, 1e-30)))}
    if histogram:
        lo, hi = np.percentile(raw, [0.1, 99.9])
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        entry["hist_edges"] = edges.tolist()
        entry["hist_raw"] = np.histogram(raw, edges)[0].tolist()
        entry["hist_rounded"] = np.histogram(rounded, edges)[0].tolist()
    return entry


def layer_numerics(reference: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray], n_layer: int) -> dict:
    """Per layer: relative error and mean cosine of ffn_out-N and l_out-N against the reference
    capture, and, for each layer whose `ffn_norm-N.fq` the test capture holds (the layers fake
    quantization touched: the eval callback sees `ffn_norm-N` as computed, then the fake-quant node
    `ffn_norm-N.fq`), rounding statistics with histograms at the first, middle and last layer."""
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    out: dict = {"layers": list(range(n_layer))}
    for name in RESIDUAL_NAMES:
        pairs = [_pair(reference, test, f"{name}-{il}") for il in range(n_layer)]
        out[f"{name}_rel_err"] = [relative_error(x0, x) for x0, x in pairs]
        out[f"{name}_cos"] = [mean_cosine(x0, x) for x0, x in pairs]
    hist_layers = {0, n_layer // 2, n_layer - 1}
    out["ffn_norm"] = {str(il): rounding_stats(test[f"ffn_norm-{il}"], test[f"ffn_norm-{il}.fq"], il in hist_layers)
                       for il in range(n_layer) if f"ffn_norm-{il}.fq" in test}
    return out
