"""A small real atlas and the budget advisor on SmolLM2-135M with F32 weights (the rounding alone):
two positions, layers 0 and 29, bf16, f16, q8_0 and mxfp4 (a block format of the format table), one
chunk (447 tokens) per point. Checks the code path, the point
cache (a second run measures nothing), what must hold of the figures, the report section, and that
the advised set's measured KLD stays within its budget.

The points are cached like the atlas's (keyed by build, model, corpus and code), so a rerun of an
unchanged tree measures only the advised set; cold, this module measures the model's baseline
(the matrix's: 9 chunks, the task prompts, generation) and 22 points.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from harness.atlas import ModelAtlas, ModelFacts, Point, advise, model_atlas, provenance
from harness.atlas_report import render_atlas
from harness.intervals import paired_ci
from harness.records import Held, MeasuredPoint

pytestmark = pytest.mark.native

MODEL = "smollm2-f32"
POSITIONS = ("attn_norm", "ffn_norm")
LAYERS = "0,29"
FORMATS = ("bf16", "f16", "q8_0", "mxfp4")
CHUNKS = 1
TOKENS = 447  # scored tokens of one chunk
BUDGET = 5e-6
"""The advisor's budget (nats): between the smallest single site here (attn_norm at layer 29, about
3e-7) and the sum of all four (about 1.4e-5), so the advisor must choose."""


@pytest.fixture(scope="module")
def session(build, offload):
    from harness.runner import ModelSession

    s = ModelSession(MODEL, build, gpu_layers=offload[1])
    yield s
    s.close()


@pytest.fixture(scope="module")
def small(session):
    """The small atlas, asked for twice: (first part, measured then, second part, measured then)."""
    first, measured = model_atlas(session, POSITIONS, LAYERS, FORMATS, CHUNKS)
    second, measured_again = model_atlas(session, POSITIONS, LAYERS, FORMATS, CHUNKS)
    return first, measured, second, measured_again


def kld_of(session, point: Point) -> np.ndarray:
    """A point's per-token KLDs, read from the point store."""
    store = ModelAtlas.of(session, CHUNKS).store
    return np.array(json.loads(store.path(point).read_text())["kld"])


def test_small_atlas_points_and_cache(small, session):
    first, measured, second, measured_again = small
    # 2 positions x 2 layers x (bf16, f16, mxfp4) + 2 positions x (bf16, f16, q8_0, mxfp4) + the reference
    assert len(first["points"]) == 21 and 0 <= measured <= 21
    assert measured_again == 0, "the second run measured points that were cached"
    assert second["points"] == first["points"]
    n_layer = session.model.n_layer
    for r in first["points"]:
        p = r["point"]
        assert "skipped" not in r, r  # ne0 = 576 for both positions: q8_0 applies
        assert r["chunks"] == CHUNKS and r["tokens"]["n_tokens"] == TOKENS
        assert r["sites"] == (1 if p["layer"] is not None or p["position"] == "result_output" else n_layer)
        mean, lo, hi = r["kld_ci"]
        assert 0 < lo <= mean <= hi, r  # rounding these activations changes the logits, and KLD >= 0
        if p["fmt"] != "mxfp4":  # 8 or more bits: a small change (mxfp4 at every layer moves 18 % of top-1s)
            assert 0.9 < r["tokens"]["top1_agreement"] <= 1 and 0.99 < r["tokens"]["ppl_ratio"] < 1.01
    timing = first["timing"]
    assert 0 < timing["points_compute_s"] <= timing["points_wall_s"]


@pytest.mark.parametrize("layer", [0, 29, None], ids=["layer0", "layer29", "all"])
def test_f16_hurts_less_than_bf16_at_ffn_norm(small, session, layer):
    """f16 keeps 3 more mantissa bits than bf16: the paired per-token difference bf16 - f16 is
    positive with its 95 % interval (measured, not assumed)."""
    diff = paired_ci(kld_of(session, Point("ffn_norm", "bf16", layer)),
                     kld_of(session, Point("ffn_norm", "f16", layer)))
    assert diff.lo > 0, diff


@pytest.mark.parametrize("layer", [0, 29, None], ids=["layer0", "layer29", "all"])
def test_mxfp4_hurts_more_than_bf16_at_ffn_norm(small, session, layer):
    """MXFP4 keeps 1 mantissa bit per element (and a shared power-of-two scale per 32), bf16 keeps 7:
    the paired per-token difference mxfp4 - bf16 is positive with its 95 % interval (measured)."""
    diff = paired_ci(kld_of(session, Point("ffn_norm", "mxfp4", layer)),
                     kld_of(session, Point("ffn_norm", "bf16", layer)))
    assert diff.lo > 0, diff


def test_small_atlas_report(small, session, tmp_path):
    first = small[0]
    data = tmp_path / "atlas" / "atlas.json"
    data.parent.mkdir()
    data.write_text(json.dumps({"provenance": provenance(ModelFacts.of(session)), "models": [first]}))
    text = render_atlas(data, tmp_path).read_text()
    ref = next(r for r in first["points"] if r["point"]["position"] == "result_output")
    assert f"## {MODEL} (F32 weights, llama, 30 layers)" in text
    assert "Reference: `result_output` bf16, KLD " in text
    assert "(only 2 of 30 layers measured, so not listed below)" in text
    assert "skipped: layers 1-28 not measured (the sum needs every layer)" in text
    assert f"{ref['kld_ci'][0]:.3g}" in text
    assert "### Where mxfp4 stays below the reference (result_output bf16), one layer at a time" in text
    for name in ("heatmap_bf16", "heatmap_f16", "heatmap_mxfp4", "ranking"):
        assert (tmp_path / "atlas" / f"{name}-{MODEL}.png").read_bytes()[:4] == b"\x89PNG"


def test_advised_set_stays_within_the_budget(session, build):
    """The advised set's measured mean KLD, with its 95 % upper bound, is at most the budget. The
    candidates are the small atlas's (attn_norm and ffn_norm at layers 0 and 29) to stay fast."""
    a = advise(session, "bf16", BUDGET, POSITIONS, LAYERS, CHUNKS)
    assert a.candidates == 4 and 0 < len(a.sites) < 4, a.sites
    assert a.predicted <= BUDGET
    m = a.measured
    assert isinstance(m, MeasuredPoint) and m.kld is None  # a summary, as atlas.json keeps points
    assert m.sites == len(a.sites)  # every chosen site is one tensor of the graph
    mean, lo, hi = m.kld_ci.to_json()
    assert hi <= BUDGET, (f"budget {BUDGET:g} exceeded: measured {mean:.3g} [{lo:.3g}, {hi:.3g}], predicted "
                          f"{a.predicted:.3g}, prediction error {a.prediction_error:+.3g}")
    assert a.held == Held(lower=True, mean=True, upper=True)
    # the printed flags reach the same tensors in the llama.cpp tools (libllama logs the site count)
    result = subprocess.run([str(build.tool("llama-completion")), "-m", a.model_path, *a.flags.split(),
                             "-p", "Hello", "-n", "1", "-no-cnv", "-lv", "4"],
                            capture_output=True, text=True, errors="replace", timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = [int(line.rsplit(": ", 1)[1].split()[0]) for line in result.stderr.splitlines()
              if "fake_quant_add: fake-quantizing" in line]
    assert counts and counts[-1] == len(a.sites), result.stderr[-2000:]


def test_advise_cli_output_and_errors(capsys):
    from harness.__main__ import main

    args = ["advise", "--model", MODEL, "--format", "bf16", "--budget", str(BUDGET), "--positions", *POSITIONS,
            "--layers", LAYERS, "--max-chunks", str(CHUNKS)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "predicted KLD (sum of single-site means)" in out and "measured KLD:" in out
    assert "llama-perplexity -m " in out and "--fake-quant-tensor " in out
    assert main([*args[:2], "tinyllama", *args[3:]]) == 1
    assert "unknown model 'tinyllama' (allowed: smollm2-q4_1" in capsys.readouterr().err
    assert main([*args[:8], "ffn_nrom", *args[10:]]) == 1
    assert "unknown position 'ffn_nrom' (allowed: attn_norm, " in capsys.readouterr().err
