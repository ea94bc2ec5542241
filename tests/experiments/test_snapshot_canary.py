"""Snapshots are compared wherever the computation is the recorded one, whatever the compiler: the
gate is each model's canary (conftest.canary), not the build fingerprint."""

from __future__ import annotations

import pytest

from harness import build as build_module
from harness import matrix

import snapshot_gate
from snapshot_gate import canary, recorded_canaries, snapshot_mismatch

pytestmark = [pytest.mark.native, pytest.mark.experiment]

MODEL = sorted(matrix.experiment_models())[0]
LABEL = matrix.model_label(MODEL)


def test_the_canary_is_reproducible_and_sees_fake_quantization(sessions, canaries):
    again = canary(sessions[MODEL])
    assert again == canaries[MODEL]
    assert again["baseline"] != again["fake_quant"]  # ffn_norm bf16 moves the logits' bits


def test_another_compiler_with_the_same_canary_compares_snapshots(canaries, monkeypatch):
    """Faking the compiler's version string changes the build key (and FINGERPRINT.json would not
    match), yet the snapshots are compared: the canary decides."""
    if recorded_canaries().get(LABEL) != canaries[MODEL]:
        pytest.skip(f"{LABEL}: this computation's canary is not the recorded one (the snapshots are re-recorded "
                    "with --snapshot-update); the gate is tested on a recorded canary below")
    real = build_module.fingerprint()["key"]
    monkeypatch.setattr(build_module, "_compiler", lambda: "c++ (Other 99.1) 99.1.0")
    assert build_module.fingerprint()["key"] != real
    assert snapshot_mismatch(LABEL, canaries[MODEL]) is None


def test_a_changed_canary_blocks_the_comparison_and_says_why(canaries, monkeypatch, tmp_path):
    monkeypatch.setattr(snapshot_gate, "CANARY_FILE", tmp_path / "CANARY.json")
    assert "no canary recorded" in snapshot_mismatch(LABEL, canaries[MODEL])
    snapshot_gate.record_canary(LABEL, canaries[MODEL])
    assert snapshot_mismatch(LABEL, canaries[MODEL]) is None
    moved = dict(canaries[MODEL], fake_quant="0" * 64)
    reason = snapshot_mismatch(LABEL, moved)
    assert "differs" in reason and "fake_quant" in reason and "baseline" not in reason.split("canary")[1]
