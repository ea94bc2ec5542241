"""harness.numerics: per-layer numerics as a pure function of two captures."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.numerics import HIST_BINS, layer_numerics, mean_cosine, relative_error, rounding_stats

SETTINGS = settings(derandomize=True, deadline=None, max_examples=100)
rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 16)),
                  elements=st.floats(-1e3, 1e3, width=32).filter(lambda v: abs(v) > 1e-3))


def capture(rng: np.random.Generator, n_layer: int, raw_layers: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    out = {}
    for il in range(n_layer):
        for name in ("ffn_out", "l_out"):
            out[f"{name}-{il}"] = rng.standard_normal((4, 8)).astype(np.float32)
    for il in raw_layers:
        raw = rng.standard_normal((4, 8)).astype(np.float32)
        out[f"ffn_norm-{il}"] = raw  # as computed; then the fake-quant node's result
        out[f"ffn_norm-{il}.fq"] = raw.astype(ml_dtypes.bfloat16).astype(np.float32)
    return out


@SETTINGS
@given(rows)
def test_a_tensor_against_itself(x):
    x64 = x.astype(np.float64)
    assert relative_error(x64, x64) == 0.0
    assert mean_cosine(x64, x64) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(rows, st.floats(0.01, 100.0))
def test_scaling_a_tensor(x, c):
    x64 = x.astype(np.float64)
    assert relative_error(x64, c * x64) == pytest.approx(abs(c - 1), rel=1e-9, abs=1e-12)
    assert mean_cosine(x64, c * x64) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(x64, -c * x64) == pytest.approx(-1.0, abs=1e-12)


def test_zero_rows_and_tensors():
    z = np.zeros((2, 3))
    assert relative_error(z, z) == 0.0 and relative_error(z, z + 1) == float("inf")
    assert mean_cosine(z, z) == 1.0 and mean_cosine(z, z + 1) == 0.0


def test_layer_numerics_of_a_capture_against_itself():
    cap = capture(np.random.default_rng(1), 5, raw_layers=(0, 2, 4))
    out = layer_numerics(cap, cap, 5)
    assert out["layers"] == [0, 1, 2, 3, 4]
    assert out["ffn_out_rel_err"] == out["l_out_rel_err"] == [0.0] * 5
    assert out["ffn_out_cos"] == pytest.approx([1.0] * 5) and out["l_out_cos"] == pytest.approx([1.0] * 5)
    assert sorted(out["ffn_norm"]) == ["0", "2", "4"]
    assert {k for k, e in out["ffn_norm"].items() if "hist_edges" in e} == {"0", "2", "4"}  # first, middle, last


def test_layer_numerics_sees_a_change_in_one_layer_only():
    ref = capture(np.random.default_rng(2), 4)
    test = dict(ref)
    test["l_out-2"] = ref["l_out-2"] * np.float32(1.5)
    out = layer_numerics(ref, test, 4)
    assert out["l_out_rel_err"] == pytest.approx([0.0, 0.0, 0.5, 0.0])
    assert out["ffn_out_rel_err"] == [0.0] * 4 and out["ffn_norm"] == {}


def test_bf16_rounding_stats():
    raw = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    rounded = raw.astype(ml_dtypes.bfloat16).astype(np.float32)
    entry = rounding_stats(raw, rounded, histogram=True)
    assert 0.9 < entry["changed_fraction"] <= 1.0
    assert 0 < entry["max_rel_change"] <= 2.0 ** -8  # round to nearest: half a bf16 ulp (8 bits)
    assert len(entry["hist_edges"]) == HIST_BINS + 1 and len(entry["hist_raw"]) == HIST_BINS
    same = rounding_stats(raw, raw.copy(), histogram=False)
    assert same["changed_fraction"] == 0.0 and same["max_rel_change"] == 0.0 and "hist_edges" not in same


def test_missing_or_mismatched_tensors_are_named():
    cap = capture(np.random.default_rng(4), 3)
    partial = {k: v for k, v in cap.items() if k != "l_out-1"}
    with pytest.raises(ValueError, match="'l_out-1' is missing from the test capture"):
        layer_numerics(cap, partial, 3)
    wrong = dict(cap, **{"ffn_out-0": cap["ffn_out-0"][:2]})
    with pytest.raises(ValueError, match=r"'ffn_out-0': shapes \(4, 8\) \(reference\) and \(2, 8\)"):
        layer_numerics(cap, wrong, 3)
    with pytest.raises(ValueError, match="n_layer must be >= 1, got 0"):
        layer_numerics(cap, cap, 0)
