"""harness.records: the typed records read and write the JSON the cache and results.json hold, unchanged."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from harness import matrix
from harness.records import (AcrossModels, Additivity, AdditivitySkipped, Comparison, DosePoint, Estimate,
                             GroupRecord, Held, additivity_from_json, MeasuredPoint, NonFinitePoint, RecordError,
                             SkippedPoint, SweepTop, Verdict, point_from_json, round_trip_cache, same_json)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_results_groups_round_trip():
    """Every group of the small results file (records with intervals) loads and writes back identical."""
    groups = json.loads((FIXTURES / "results_small.json").read_text())["groups"]
    for data in groups:
        record = GroupRecord.from_json(data)
        assert same_json(record.to_json(), data), data["group"]
        assert isinstance(record.tokens.kld_ci, Estimate) and record.tokens.kld_ci.estimate == data["tokens"]["kld_ci"][0]
    # the cached form: no intervals
    bare = dict(groups[0], tokens={k: v for k, v in groups[0]["tokens"].items() if not k.endswith("_ci")
                                   and k != "blocks"})
    assert GroupRecord.from_json(bare).tokens.kld_ci is None and same_json(GroupRecord.from_json(bare).to_json(), bare)


def test_results_analysis_round_trips():
    """The verdicts, dose response and sweep tops of the small results file load as Verdict,
    DosePoint and SweepTop and write back identical."""
    data = json.loads((FIXTURES / "results_small.json").read_text())
    for v in data["verdicts"]:
        typed = Verdict.from_json(v)
        assert same_json(typed.to_json(), v) and all(isinstance(c, Comparison) for c in typed.comparisons)
    for points in data["dose_response"].values():
        assert all(same_json(DosePoint.from_json(p).to_json(), p) for p in points)
    for top in data["sweep_top"].values():
        assert same_json(SweepTop.from_json(top).to_json(), top)
    with pytest.raises(RecordError, match="has no field 'p_adjusted'"):
        Comparison.from_json(dict(data["verdicts"][0]["comparisons"][0], p_adjusted=0.1))


@pytest.mark.parametrize("n_layer", [18, 30])
def test_sweep_groups_carry_their_layer(n_layer):
    """Group.layer is the layer the sweep group's rule names, and the group's id; the cache key leaves
    the field out (the rules name the layer), so adding it changed no cached group's key."""
    for g in matrix.groups(n_layer):
        if g.kind == "sweep":
            assert (g.rules[0].layers, g.id) == (str(g.layer), matrix.layer_id(g.layer))
        else:
            assert g.layer is None
        assert json.loads(g.key()) == {k: v for k, v in json.loads(json.dumps(asdict(g))).items() if k != "layer"}
    assert [g.layer for g in matrix.groups(n_layer) if g.kind == "sweep"] == list(range(n_layer))


def test_atlas_points_are_three_types():
    points = json.loads((FIXTURES / "atlas_points_small.json").read_text())["points"]
    typed = [point_from_json(p) for p in points]
    assert [type(t) for t in typed] == [MeasuredPoint, NonFinitePoint, SkippedPoint]
    assert all(same_json(t.to_json(), p) for t, p in zip(typed, points, strict=True))
    summary = {k: v for k, v in points[0].items() if k != "kld"}  # atlas.json's point summaries
    assert same_json(point_from_json(summary).to_json(), summary)


def test_a_record_of_another_layout_is_refused(tmp_path):
    group = json.loads((FIXTURES / "results_small.json").read_text())["groups"][0]
    with pytest.raises(RecordError, match="has no field 'kld_mean_typo'"):
        GroupRecord.from_json(dict(group, tokens=dict(group["tokens"], kld_mean_typo=1.0)))
    with pytest.raises(RecordError, match=r"expected \[estimate, lo, hi\]"):
        Estimate.from_json([1.0, 2.0])
    with pytest.raises(RecordError, match="a skipped point has only"):
        point_from_json({"point": {"position": "x", "fmt": "bf16", "layer": None}, "skipped": "r", "sites": 1})
    # the cache check names a file that does not come back
    bad = tmp_path / "results" / "m-g-0" / "record.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps(dict(group, extra=1)))
    (tmp_path / "results" / "m-h-0").mkdir()
    (tmp_path / "results" / "m-h-0" / "record.json").write_text(json.dumps(group))
    checked, problems = round_trip_cache(tmp_path)
    assert checked == 2 and len(problems) == 1 and "m-g-0" in problems[0]


def test_baseline_files_are_named_in_one_place(tmp_path):
    """harness.runner.BaselineFiles: the names cached baselines hold, written and read back."""
    import numpy as np

    from harness.runner import BaselineFiles

    files = BaselineFiles(tmp_path)
    np.save(files.chunk_path(3), np.ones((2, 4), np.float32))
    np.save(files.task_path(12), np.zeros((1, 4), np.float32))
    files.write_generation({"design": [1, 2]})
    files.write_tensors({"l_out-0": np.arange(3, dtype=np.float32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk03.npy", "generation.json", "numerics.npz",
                                                          "task012.npy"]
    assert files.chunk(3).sum() == 8 and files.task(12).shape == (1, 4)
    assert files.generation() == {"design": [1, 2]} and files.tensors()["l_out-0"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("budget, verdict", [
    (0.5, "exceeded"), (1.0, "undecided"), (1.5, "undecided"), (2.0, "undecided"),  # a bound equal to the
    (2.5, "undecided"), (3.0, "held"), (4.0, "held"),                              # budget is within it
])
def test_the_budget_verdict_comes_from_the_interval(budget, verdict):
    """Every place of the budget against a measured KLD of 2 [1, 3]: below the interval, at each bound,
    inside it on either side of the mean, above it."""
    held = Held.of(Estimate(2.0, 1.0, 3.0), budget)
    assert held.verdict.startswith(verdict), (budget, held)
    if verdict == "undecided":
        assert ("mean is within" in held.verdict) == (budget >= 2.0)


def test_additivity_entries_and_verdicts_across_models_round_trip():
    """The atlas's additivity entries (measured or skipped) and results.json's across_models entries read
    back as types and write back the same JSON; an unknown key is an error naming it."""
    measured = {"position": "ffn_norm", "fmt": "mxfp4", "n_tokens": 447, "sum_ci": [0.28, 0.26, 0.31],
                "all_ci": [0.34, 0.30, 0.37], "difference_ci": [-0.05, -0.08, -0.02],
                "verdict": "super-additive (all layers at once hurt more than the sum)"}
    skipped = {"position": "l_out", "fmt": "f16", "skipped": "non-finite logits at layers 7-16 (no finite sum)"}
    assert isinstance(additivity_from_json(measured), Additivity)
    assert isinstance(additivity_from_json(skipped), AdditivitySkipped)
    for entry in (measured, skipped):
        assert json.dumps(additivity_from_json(entry).to_json()) == json.dumps(entry)
    across = {"hypothesis": "H2", "statement": "s", "finding": "weight format", "verdicts": {"a": "holds", "b": "refuted"},
              "formats": {"a": "quantized", "b": "F32"}, "differs": {"weight format": [["a", "b"]], "architecture": []},
              "compared": {"weight format": 1, "architecture": 0}, "unrecorded": []}
    assert json.dumps(AcrossModels.from_json(across).to_json()) == json.dumps(across)
    with pytest.raises(RecordError, match="has no field 'extra'"):
        additivity_from_json(measured | {"extra": 1})
