"""The atlas's pure parts: positions from a listing, the plan, the adaptive stopping rule, the point
store (resume after a kill, a second run measures nothing), additivity arithmetic, the advisor's
selection (never over budget, maximal), layer specs and flags, bad input, and the report rendered
from a synthetic atlas.json."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import atlas
from harness.atlas import (Point, PointStore, Position, additivity, check_advice, check_choice, cli_flags, eta_text,
                           layer_spec, left_out, parse_layers, plan, positions_of, rules_for, run_points,
                           select_sites, skip_reason, stop_reason)
from harness.atlas_report import render_atlas
from harness.cache import HarnessError
from harness.driver import FakeQuantRule, Target
from harness.intervals import Interval
from harness.metrics import token_stats
from harness.records import MeasuredPoint, NonFinitePoint, TokenSummary, point_from_json
from harness.reference import parse_layers as reference_parse_layers
from harness.measurement import ATLAS_VERSION
from harness.runner import BaselineFiles, ModelSession

N_LAYER = 4
EVERY = tuple(range(N_LAYER))
LISTING = [
    Target("pp", "embd", (), (8, 16), 1),
    Target("pp", "norm", EVERY, (8, 16), 2 * N_LAYER + 1),   # twice a layer: left out
    Target("pp", "attn_norm", EVERY, (8, 16), N_LAYER),
    Target("pp", "Kcur", EVERY, (4, 16), 3 * N_LAYER),        # three times a layer: left out
    Target("pp", "ffn_up", EVERY, (96, 16), N_LAYER),
    Target("pp", "ffn_norm", EVERY, (8, 16), N_LAYER),
    Target("pp", "result_norm", (), (8, 16), 1),
    Target("pp", "result_output", (), (64, 16), 1),
    Target("tg", "odd_tg_only", EVERY, (8,), N_LAYER),         # another graph: not a position
]


def ci(estimate: float, lo: float, hi: float) -> Interval:
    return Interval(estimate, lo, hi, 1, 0.5)


# positions and plan ----------------------------------------------------------------------------


def test_positions_are_the_names_once_per_layer_plus_the_two_of_no_layer():
    got = positions_of(LISTING, N_LAYER)
    assert [(p.name, p.ne0, p.layered) for p in got] == [
        ("attn_norm", 8, True), ("ffn_up", 96, True), ("ffn_norm", 8, True),
        ("result_norm", 8, False), ("result_output", 64, False)]
    assert left_out(LISTING, N_LAYER) == ["norm (9 tensors)", "Kcur (12 tensors)"]


def test_a_graph_without_the_reference_is_an_error():
    with pytest.raises(HarnessError, match="no 'result_output' without a layer"):
        positions_of([t for t in LISTING if t.name != "result_output"], N_LAYER)


def test_plan_counts_every_point_and_records_block_format_skips_with_the_reason():
    positions = positions_of(LISTING, N_LAYER)
    points = plan(positions, [0, 3], atlas.FORMATS)
    layered = [p for p in positions if p.layered]
    assert len(points) == len(layered) * 2 * len(atlas.SINGLE_FORMATS) + len(positions) * len(atlas.FORMATS)
    assert len(set(points)) == len(points)
    assert {p.fmt for p in points if p.layer is not None} == set(atlas.SINGLE_FORMATS)
    ne0 = {p.name: p.ne0 for p in positions}
    skipped = {p.slug: skip_reason(p, ne0[p.position]) for p in points if skip_reason(p, ne0[p.position])}
    # q8_0 and mxfp4_ggml need rows of a multiple of 32 (the MX and NVFP4 formats take a shorter last block)
    assert set(skipped) == {f"{p}.{f}.all" for p in ("attn_norm", "ffn_norm", "result_norm")
                            for f in ("q8_0", "mxfp4_ggml")}
    assert skipped["ffn_norm.q8_0.all"] == "q8_0 rounds blocks of 32 values along ne0; ffn_norm has ne0 = 8"
    assert skipped["ffn_norm.mxfp4_ggml.all"] == "mxfp4_ggml rounds blocks of 32 values along ne0; ffn_norm has ne0 = 8"


def test_layers_none_plans_every_layer_at_once_only(tmp_path):
    facts = atlas.ModelFacts("m", "/m.gguf", "ab" * 32, "llama", "F32", N_LAYER, 9, tuple(LISTING),
                             {"model": "ab", "build": "k"}, {"key": "k"}, {"name": "t", "sha256": "s"}, {"name": "cpu"})
    planned = atlas.ModelAtlas(facts, 1, tmp_path).plan(["ffn_norm"], atlas.NO_SINGLE_LAYERS, ["mxfp4", "bf16"])
    assert planned == [Point("ffn_norm", "bf16"), Point("ffn_norm", "mxfp4"), Point("result_output", "bf16")]


def test_the_reference_point_is_added_to_any_selection():
    ffn = [Position("ffn_norm", 576, True)]
    points = plan(ffn, [1], ["f16"])
    assert points == [Point("ffn_norm", "f16", 1), Point("ffn_norm", "f16"), Point("result_output", "bf16")]
    assert Point("ffn_norm", "bf16", 7).rule == FakeQuantRule("ffn_norm", "bf16", "7")
    assert Point("result_output", "bf16").rule == FakeQuantRule("result_output", "bf16", "-1")


def test_a_skipped_point_is_recorded_without_touching_the_model():
    record = atlas.measure_point(None, Point("ffn_norm", "q8_0"), 100, 4)  # type: ignore[arg-type]
    assert record == {"point": {"position": "ffn_norm", "fmt": "q8_0", "layer": None},
                      "skipped": "q8_0 rounds blocks of 32 values along ne0; ffn_norm has ne0 = 100"}


# stopping rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "chunks", "expected"), [
    (ci(0.0, 0.0, 0.0), 1, "zero"),
    (ci(1.0, 0.75, 1.25), 1, "tight"),     # half-width exactly 25 % of the mean
    (ci(1.0, 0.7, 1.3), 1, None),          # 30 %: another chunk
    (ci(1.0, 0.7, 1.3), 3, None),
    (ci(1.0, 0.7, 1.3), 4, "max"),
    (ci(-1e-18, -2e-18, 1e-18), 1, None),  # rounding noise around 0 is not "zero" and never tight
    (ci(-1e-18, -2e-18, 1e-18), 4, "max"),
])
def test_stop_reason(interval, chunks, expected):
    assert stop_reason(interval, chunks, 4) == expected


@given(mean=st.floats(1e-12, 1.0), rel=st.floats(0.0, 2.0), chunks=st.integers(1, 9), max_chunks=st.integers(1, 9))
def test_stop_reason_stops_at_the_maximum_and_only_tight_intervals_earlier(mean, rel, chunks, max_chunks):
    lo, hi = mean - rel * mean, mean + rel * mean
    reason = stop_reason(ci(mean, lo, hi), chunks, max_chunks)
    if chunks >= max_chunks:
        assert reason is not None
    assert (reason == "tight") == ((hi - lo) / 2 <= atlas.REL_HALF_WIDTH * mean)


# the point store -------------------------------------------------------------------------------


class FakeMeasure:
    """Counts calls; raises at the call numbered `fail_at` (a run killed there)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def __call__(self, point: Point) -> dict:
        self.calls.append(point.slug)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("killed")
        return {"point": {"position": point.position, "fmt": point.fmt, "layer": point.layer},
                "kld": [len(point.slug) * 1e-6], "kld_ci": [len(point.slug) * 1e-6] * 3}


POINTS = [Point("ffn_norm", "bf16", il) for il in range(5)] + [Point("ffn_norm", "bf16")]


def test_a_killed_run_resumes_and_a_second_run_measures_nothing(tmp_path, capsys):
    store = PointStore(tmp_path / "model-key")
    killed = FakeMeasure(fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_points(POINTS, store, killed)
    assert [p for p in POINTS if store.has(p)] == POINTS[:3]  # finished points kept, none half-written
    assert not any(path.name.startswith(".") for path in store.directory.iterdir())
    resumed = FakeMeasure()
    records, measured = run_points(POINTS, store, resumed)
    assert resumed.calls == [p.slug for p in POINTS[3:]] and measured == 3
    again = FakeMeasure()
    records_again, measured_again = run_points(POINTS, store, again)
    assert again.calls == [] and measured_again == 0 and records_again == records
    assert [r["point"]["layer"] for r in records] == [0, 1, 2, 3, 4, None]
    err = capsys.readouterr().err
    assert "6/6 points, ffn_norm.bf16.all cached; done" in err


def test_eta_counts_only_points_still_to_measure():
    assert eta_text(10.0, 2, 3) == "3 to measure, ETA 0 min 15 s"
    assert eta_text(0.0, 0, 7) == "7 to measure, ETA after the first"
    assert eta_text(99.0, 5, 0) == "done"


def test_store_key_holds_the_declared_versions_and_the_rule_not_the_code(tmp_path):
    # a model given as a path: its stores are named by the file's stem, inside the root
    session = SimpleNamespace(name="/models/m.gguf", key={"model": "abc", "build": "k"})
    session.entry_name = partial(ModelSession.entry_name, session)
    key = atlas.store_key(session, 4)
    assert key == {"model": "abc", "build": "k", "atlas": str(ATLAS_VERSION), "max_chunks": "4",
                   "rule": f"{atlas.REL_HALF_WIDTH}/{atlas.RESAMPLES}/{atlas.CONFIDENCE}/{atlas.SEED}"}
    dirs = {atlas.store_for(session, n, tmp_path).directory for n in (1, 4)}
    assert len(dirs) == 2 and all(d.parent == tmp_path and d.name.startswith("m-") for d in dirs)


# additivity ------------------------------------------------------------------------------------


def test_additivity_of_exactly_additive_layers():
    rng = np.random.default_rng(0)
    singles = [rng.gamma(0.5, 1e-6, 900) for _ in range(3)]
    result = additivity("ffn_norm", "bf16", singles, np.sum(singles, axis=0))
    assert (result.position, result.fmt, result.n_tokens) == ("ffn_norm", "bf16", 900)
    assert result.difference_ci.to_json() == [0.0, 0.0, 0.0] and result.verdict.startswith("additive")
    assert result.sum_ci.estimate == pytest.approx(np.sum(singles, axis=0).mean(), rel=1e-12)


def test_additivity_directions_and_the_common_prefix():
    rng = np.random.default_rng(1)
    singles = [rng.gamma(0.5, 1e-6, 894), rng.gamma(0.5, 1e-6, 447)]  # one point stopped after one chunk
    total = singles[0][:447] + singles[1]
    half = additivity("l_out", "mxfp4", singles, np.concatenate([total / 2, np.ones(447)]))
    assert half.n_tokens == 447
    assert half.all_ci.estimate == pytest.approx(total.mean() / 2, rel=1e-12)
    assert half.difference_ci.lo > 0 and half.verdict.startswith("sub-additive")
    double = additivity("l_out", "mxfp4", singles, total * 2)
    assert double.difference_ci.hi < 0 and double.verdict.startswith("super-additive")


# the advisor -----------------------------------------------------------------------------------

sites_st = st.dictionaries(
    st.tuples(st.sampled_from(["attn_norm", "ffn_norm", "l_out"]), st.one_of(st.none(), st.integers(0, 29))),
    st.floats(0.0, 1e-3, allow_subnormal=False), max_size=40)


@settings(max_examples=300)
@given(kld=sites_st, budget=st.floats(0.0, 5e-3, allow_subnormal=False))
def test_advisor_never_exceeds_the_budget_and_no_larger_set_fits(kld, budget):
    chosen = select_sites(kld, budget)
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(kld)
    assert math.fsum(kld[s] for s in chosen) <= budget
    rest = sorted(kld[s] for s in kld if s not in chosen)
    if rest:  # any larger set sums to at least the chosen plus the smallest of the rest
        assert math.fsum([*(kld[s] for s in chosen), rest[0]]) > budget
        assert max(kld[s] for s in chosen) <= rest[0] if chosen else True


@given(kld=st.dictionaries(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), st.floats(0.0, 1.0), max_size=8),
       budget=st.floats(0.0, 3.0))
def test_advisor_count_is_the_largest_of_every_subset(kld, budget):
    sites = list(kld)
    best = max((k for k in range(len(sites) + 1) for subset in itertools.combinations(sites, k)
                if math.fsum(kld[s] for s in subset) <= budget), default=0)
    assert len(select_sites(kld, budget)) == best


def test_advisor_selection_is_deterministic_on_ties():
    kld = {("b", 1): 1.0, ("a", 2): 1.0, ("a", None): 1.0, ("a", 0): 1.0}
    assert select_sites(kld, 2.5) == [("a", None), ("a", 0)]
    assert select_sites(kld, 0.5) == []
    with pytest.raises(ValueError, match="budget"):
        select_sites(kld, -1.0)


def test_rules_and_flags_of_an_advised_set():
    sites = [("ffn_norm", 0), ("ffn_norm", 2), ("ffn_norm", 1), ("ffn_norm", 5), ("attn_norm", 29),
             ("result_output", None)]
    rules = rules_for(sites, "bf16")
    assert rules == [FakeQuantRule("attn_norm", "bf16", "29"), FakeQuantRule("ffn_norm", "bf16", "0-2,5"),
                     FakeQuantRule("result_output", "bf16", "-1")]
    assert cli_flags(rules) == ("--fake-quant-tensor attn_norm:bf16:29 --fake-quant-tensor ffn_norm:bf16:0-2,5 "
                                "--fake-quant-tensor result_output:bf16")


@given(st.sets(st.integers(0, 63), min_size=1))
def test_layer_spec_round_trips_through_the_reference_parser(layers):
    spec = layer_spec(layers)
    assert reference_parse_layers(spec, 64) == frozenset(layers)
    assert parse_layers(spec, 64) == sorted(layers)
    assert len(spec.split(",")) == 1 + sum(1 for a in layers if a + 1 not in layers and a < max(layers))


@pytest.mark.parametrize(("spec", "message"), [
    ("3-", "malformed layer spec '3-'"), ("x", "malformed layer spec 'x'"),
    ("30", "selects layers outside 0-29 (the model has 30)"), ("5-2", "selects layers outside"),
    ("", "malformed layer spec ''"), ("1,,2", "malformed"),
])
def test_bad_layer_specs_name_the_spec(spec, message):
    with pytest.raises(HarnessError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_layers(spec, 30)


@pytest.mark.parametrize(("fmt", "budget", "message"), [
    ("fp4", 1e-5, "unknown format 'fp4' for the advisor (allowed: bf16, f16, q8_0, fp8_e4m3,"),
    ("int4", 1e-5, "unknown format 'int4'"),
    ("bf16", -1e-6, "budget -1e-06 is not allowed: it must be a finite KLD >= 0"),
    ("bf16", math.nan, "budget nan is not allowed"),
    ("bf16", math.inf, "budget inf is not allowed"),
])
def test_bad_advice_is_a_clear_error(fmt, budget, message):
    with pytest.raises(HarnessError) as info:
        check_advice(fmt, budget)
    assert message in str(info.value)


def test_unknown_positions_and_formats_name_what_is_allowed():
    with pytest.raises(HarnessError, match=r"unknown position 'ffn_nrom' \(allowed: attn_norm, ffn_norm\)"):
        check_choice("position", ["ffn_nrom"], ["attn_norm", "ffn_norm"])
    assert check_choice("format", ["q8_0", "bf16"], atlas.FORMATS) == ["bf16", "q8_0"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget", "-1"], "budget '-1' is not allowed: give a finite KLD >= 0 in nats"),
    (["--budget", "abc"], "budget 'abc' is not a number"),
    (["--budget", "inf"], "budget 'inf' is not allowed"),
])
def test_cli_rejects_a_bad_budget(argv, message, capsys):
    from harness.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["advise", "--model", "smollm2-f32", "--format", "bf16", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_a_format_before_loading_a_model(capsys):
    from harness.__main__ import main

    assert main(["advise", "--model", "no-such-model", "--format", "fp4", "--budget", "1e-5"]) == 1
    assert "unknown format 'fp4' for the advisor" in capsys.readouterr().err


# the report, from a synthetic atlas.json ------------------------------------------------------


def synthetic_model(label: str, weight_type: str, scale: float, n_layer: int = 3) -> dict:
    """Two layered positions (ffn_norm with ne0 not a multiple of 32) and the two of no layer."""
    positions = [{"name": "attn_norm", "ne0": 64, "layered": True}, {"name": "ffn_norm", "ne0": 40, "layered": True},
                 {"name": "result_norm", "ne0": 64, "layered": False},
                 {"name": "result_output", "ne0": 256, "layered": False}]

    def point(position, fmt, layer, value):
        tokens = dict.fromkeys(sorted({f.name for f in fields(TokenSummary)} - TokenSummary.OPTIONAL), value)
        return {"point": {"position": position, "fmt": fmt, "layer": layer}, "rules": rules_of(position, fmt, layer),
                "sites": 1, "chunks": 1, "stop": "tight", "kld_ci": [value, value * 0.9, value * 1.1], "block": 2,
                "tokens": tokens | {"n_tokens": 447, "top1_agreement": 0.999, "ppl_ratio": 1.0001},
                "timing": {"wall_s": 1.0, "compute_s": 0.9}}

    points = [point(p, f, il, scale * (il + 1) * (10 if f == "bf16" else 1) * (2 if p == "ffn_norm" else 1) * 1e-7)
              for p in ("attn_norm", "ffn_norm") for f in ("bf16", "f16") for il in range(n_layer)]
    points += [point(p, f, None, scale * (30 if p == "attn_norm" else 50 if f == "bf16" else 5) * 1e-7)
               for p in ("attn_norm", "ffn_norm", "result_norm") for f in ("bf16", "f16")]
    points.append({"point": {"position": "ffn_norm", "fmt": "q8_0", "layer": None},
                   "skipped": "q8_0 rounds blocks of 32 values along ne0; ffn_norm has ne0 = 40"})
    points.append(point("result_output", "bf16", None, 3.5e-4))
    additive = [{"position": "attn_norm", "fmt": "bf16", "n_tokens": 447, "sum_ci": [6e-6, 5e-6, 7e-6],
                 "all_ci": [3e-6, 2e-6, 4e-6], "difference_ci": [3e-6, 2e-6, 4e-6],
                 "verdict": "sub-additive (all layers at once hurt less than the sum)"},
                {"position": "ffn_norm", "fmt": "f16", "skipped": "layers 2 not measured (the sum needs every layer)"}]
    return {"model": label, "label": label, "path": f"/m/{label}.gguf", "sha256": "ab" * 32, "arch": "llama",
            "weight_type": weight_type, "n_layer": n_layer, "store": "/s", "max_chunks": 4, "positions": positions,
            "left_out": ["norm (7 tensors)"], "points": points, "additivity": additive,
            "timing": {"points_wall_s": 10.0, "points_compute_s": 9.0, "points_compute_share": 0.9,
                       "run_wall_s": 12.0, "run_compute_s": 9.0}}


def synthetic_atlas(tmp_path: Path, models: list[dict]) -> Path:
    build = {"key": "k", "llama_cpp_commit": "c" * 40, "patch_sha256": "p" * 64}
    data = {"provenance": {"date": "today", "build": build,
                           "corpus": {"name": "text", "sha256": "s" * 64}, "n_ctx": 512, "scored_from": 64,
                           "tokens_per_chunk": 447,
                           "rule": {"rel_half_width": 0.25, "resamples": 2000, "confidence": 0.95, "seed": 0,
                                    "q8_0_block": 32, "reference": ["result_output", "bf16"]}},
            "models": models}
    path = tmp_path / "atlas.json"
    path.write_text(json.dumps(data))
    return path


def test_report_of_two_models(tmp_path):
    path = synthetic_atlas(tmp_path, [synthetic_model("q4", "Q4_1", 100.0), synthetic_model("f32", "F32", 1.0)])
    text = render_atlas(path, tmp_path / "out").read_text()
    for heading in ("# Precision atlas", "## q4 (Q4_1 weights, llama, 3 layers)", "## f32 (F32 weights",
                    "### Where bf16 stays below the reference (result_output bf16), one layer at a time",
                    "### Where f16 stays below the reference (result_output bf16), one layer at a time",
                    "### Every layer at once",
                    "### Additivity", "## Between models", "### q4 vs f32: weights Q4_1 vs F32 (same architecture"):
        assert heading in text
    # f32: attn_norm's worst bf16 layer is 2 (3e-6 < 3.5e-4 reference, every upper bound below its lower bound)
    assert "| `attn_norm` | 3 | 2 | 3e-06 [2.7e-06, 3.3e-06] | yes, clearly |" in text
    # q4: ffn_norm bf16 at layer il is 100 * (il + 1) * 10 * 2 * 1e-7: 2e-4, 4e-4, 6e-4 against 3.5e-4
    assert "| `ffn_norm` | 3 | 2 | 0.0006 [0.00054, 0.00066] | no: mean at or above it at layers 1, 2 |" in text
    assert ("Skipped: `ffn_norm` q8_0 every layer: q8_0 rounds blocks of 32 values along ne0; ffn_norm has "
            "ne0 = 40") in text
    assert "skipped: layers 2 not measured" in text and "1 sub-additive" in text
    assert "over 4 common positions: median 100, from 1 (`result_output`) to 100 (`" in text
    assert "left out, named more than once a layer: norm (7 tensors)" in text
    # the position x format overview against the reference (3.5e-4 [3.15e-4, 3.85e-4]), positions by bf16 KLD:
    # f32 attn_norm bf16 3e-6 is clearly below; q4 ffn_norm bf16 5e-4 is above; q8_0 of ffn_norm is skipped
    assert "| bf16 | 0.00035 (ref.) | 5e-06 ✓ | 5e-06 ✓ | 3e-06 ✓ |" in text
    assert "| q8_0 | skip | – | – | – |" in text and "| q8_0 | – | skip | – | – |" in text
    assert "| bf16 | 0.0005 ✗ | 0.0005 ✗ | 0.00035 (ref.) | 0.0003 ≈ |" in text
    # per format between the models: f32 takes bf16 at ffn_norm, attn_norm and result_norm; q4 at none
    assert ("| bf16 | 4 | none | `attn_norm`, `ffn_norm`, `result_norm` | `attn_norm`, `ffn_norm`, `result_norm` "
            "| 0.33 |") in text
    for name in ("heatmap_bf16-q4", "heatmap_f16-q4", "ranking-q4", "heatmap_bf16-f32", "ranking-f32"):
        assert (tmp_path / "out" / "atlas" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(atlas/{name}.png)" in text


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(HarnessError, match="run `python -m harness atlas` first"):
        render_atlas(tmp_path / "none.json", tmp_path)
    broken = synthetic_model("m", "F32", 1.0)
    del broken["additivity"]
    with pytest.raises(HarnessError, match="is malformed"):
        render_atlas(synthetic_atlas(tmp_path, [broken]), tmp_path / "out")


# non-finite logits: a result, the worst one ----------------------------------------------------


def rules_of(position: str, fmt: str, layer: int | None) -> list[dict]:
    """A point's rules as the atlas records them (harness.atlas.Point.rule)."""
    return [asdict(Point(position, fmt, layer).rule)]


def overflowed(position: str, fmt: str, layer: int | None) -> dict:
    return {"point": {"position": position, "fmt": fmt, "layer": layer}, "rules": rules_of(position, fmt, layer),
            "sites": 1, "chunks": 1,
            "stop": "non-finite", "non_finite": {"chunk": 0, "rows": 447, "of": 447},
            "timing": {"wall_s": 1.0, "compute_s": 0.9}}


def test_report_shows_non_finite_points_as_the_worst(tmp_path):
    """f16 overflowing at attn_norm layers 1-2 and every layer at once: listed, drawn black, never a
    KLD, not 'below the reference', kept out of sums and rankings."""
    model = synthetic_model("g", "F32", 1.0)
    replaced = {("attn_norm", "f16", 1), ("attn_norm", "f16", 2), ("attn_norm", "f16", None)}
    model["points"] = [overflowed(*key) if (key := tuple(r["point"].values())) in replaced else r
                       for r in model["points"]]
    model["points"].append(overflowed("ffn_norm", "bf16", 0))
    model["points"] = [r for r in model["points"] if tuple(r["point"].values()) != ("ffn_norm", "bf16", 0)
                       or "non_finite" in r]
    text = render_atlas(synthetic_atlas(tmp_path, [model]), tmp_path / "out").read_text()
    assert "### Non-finite logits: where the format's range is exceeded" in text
    assert "| f16 | `attn_norm` | 1-2 | yes | 447 of 447 |" in text
    assert "| bf16 | `ffn_norm` | 0 | no | 447 of 447 |" in text
    assert "| `ffn_norm` | 2 | 2 |" in text and "no: non-finite logits at layers 0 |" in text
    assert "**non-finite logits**" in text  # attn_norm f16, every layer at once
    assert "20 points: 4 non-finite, 1 skipped, 15 tight" in text  # the stop counts
    assert (tmp_path / "out" / "atlas" / "heatmap_f16-g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeSession:
    """Just what measure_rules reads: two chunks, finite baselines, and test logits that turn
    non-finite in the chunk given."""

    def __init__(self, tmp_path: Path, bad_chunk: int | None, bad_rows: int = 3, baseline_bad: bool = False) -> None:
        from harness import matrix

        n_tokens = matrix.TOKENS_PER_CHUNK
        rng = np.random.default_rng(0)
        self.baseline = BaselineFiles(tmp_path)
        self.chunks = [list(rng.integers(0, 16, matrix.N_CTX)) for _ in range(2)]
        self.logits = [rng.standard_normal((n_tokens, 16)).astype(np.float32) for _ in range(2)]
        for i, base in enumerate(self.logits):
            saved = base.copy()
            if baseline_bad and i == 0:
                saved[0, 0] = np.nan
            np.save(self.baseline.chunk_path(i), saved)
        self.bad_chunk, self.bad_rows = bad_chunk, bad_rows
        self.ctx = SimpleNamespace(set_fake_quant=lambda rules: None, fake_quant_sites=1, compute_seconds=0.0)
        self.calls = 0
        self.token_stats = partial(token_stats, threads=2)

    def start_layer(self, rules):
        return 0  # the whole graph: starting at a layer is tests/atlas/test_start_at.py's

    def start(self, i, layer):
        return None

    def _scored_logits(self, chunk, copy=False, start=None):
        i = self.calls
        self.calls += 1
        test = self.logits[i] + np.float32(1e-3)
        if i == self.bad_chunk:
            test[:self.bad_rows, 5] = np.inf
        return test


@pytest.mark.parametrize("bad_chunk", [0, 1])
def test_measure_rules_records_non_finite_logits(tmp_path, bad_chunk, monkeypatch):
    monkeypatch.setattr(atlas, "stop_reason", lambda ci, chunks, max_chunks: None if chunks < max_chunks else "max")
    typed = atlas.measure_rules(FakeSession(tmp_path, bad_chunk), [FakeQuantRule("x", "f16")], max_chunks=2)
    assert isinstance(typed, NonFinitePoint)
    record = typed.to_json()
    assert record["non_finite"] == {"chunk": bad_chunk, "rows": 3, "of": record["non_finite"]["of"]}
    assert record["stop"] == "non-finite" and record["chunks"] == bad_chunk + 1
    assert "kld_ci" not in record and "kld" not in record and isinstance(point_from_json(record), NonFinitePoint)
    of = record["non_finite"]["of"]
    assert atlas.non_finite_text(typed) == f"non-finite logits (3 of {of} rows of chunk {bad_chunk})"


def test_measure_rules_with_finite_logits_has_a_kld(tmp_path):
    typed = atlas.measure_rules(FakeSession(tmp_path, None), [FakeQuantRule("x", "f16")], max_chunks=2)
    assert isinstance(typed, MeasuredPoint) and typed.kld_ci.estimate > 0
    assert isinstance(point_from_json(typed.to_json()), MeasuredPoint)


def test_a_non_finite_baseline_is_still_an_error(tmp_path):
    """Only the fake-quantized logits may be non-finite; a broken baseline is not a measurement."""
    with pytest.raises(ValueError, match="non-finite logits in rows"):
        atlas.measure_rules(FakeSession(tmp_path, None, baseline_bad=True), [FakeQuantRule("x", "f16")], max_chunks=2)


def test_an_atlas_without_bf16_ranks_and_compares_by_its_own_format(tmp_path):
    """An atlas of other formats has bf16 only at the reference (the logits): positions are ranked and the
    models compared by the format with the most all-layers points, named in the text (not by bf16's one)."""
    def as_fp8(model: dict) -> dict:
        for r in model["points"]:
            pid = r["point"]
            if pid["fmt"] == "bf16" and pid["position"] != "result_output":
                pid["fmt"] = "fp8_e4m3"
                r["rules"] = rules_of(pid["position"], "fp8_e4m3", pid["layer"])
        model["additivity"] = [a for a in model["additivity"] if a.get("fmt") != "bf16"]
        return model

    path = synthetic_atlas(tmp_path, [as_fp8(synthetic_model("q4", "Q4_1", 100.0)),
                                      as_fp8(synthetic_model("f32", "F32", 1.0))])
    text = render_atlas(path, tmp_path / "out").read_text()
    assert "- All-layers fp8_e4m3 KLD, q4 / f32, over 3 common positions:" in text
    assert "Most harmful position at every layer (fp8_e4m3): q4 `ffn_norm`, f32 `ffn_norm`" in text
