"""harness.verdicts on synthetic per-token data: one Holm family per model, the sweep's top layer
against the runner-up, the recorded verdicts' file, and what recorded verdicts depend on across models."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from harness import verdicts
from harness.records import Verdict

N = 2000


def fake_data(kld_means: dict[str, float], noise: float = 1e-4, tasks: tuple[float, float] = (1.0, 1.0)):
    """Groups whose per-token KLD is a shared token effect plus a group offset (paired data)."""
    rng = np.random.default_rng(0)
    shared = rng.exponential(1e-3, N)
    store = {}
    for k, (gid, mean) in enumerate(sorted(kld_means.items())):
        kld = shared + mean + np.random.default_rng(k + 1).normal(0, noise, N)
        arrays = {"kld": kld, "task_kld_arithmetic": rng.normal(tasks[0], 0.1, 100),
                  "task_kld_text": rng.normal(tasks[1], 0.1, 100)}
        store[gid] = ({"tokens": {"kld_mean": float(kld.mean())}}, arrays)
    return store.__getitem__


def by_id(family: list[Verdict]) -> dict[str, Verdict]:
    return {v.hypothesis: v for v in family}


def test_family_verdicts_follow_the_data():
    data = fake_data({"all": 0.01, "logits": 0.001, "first5": 0.002, "last5": 0.004, "all_f16": 0.01},
                     tasks=(1.0, 1.2))
    got = by_id(verdicts.family("m", data, resamples=2000))
    assert got["H1"].verdict == "holds"          # all > logits
    assert got["H2"].verdict == "refuted"        # first5 < last5
    assert got["H3"].verdict == "holds"          # all > first5 and all > last5
    assert got["H4"].verdict == "inconclusive"   # all == all_f16
    assert got["H5"].verdict == "refuted"        # arithmetic < text
    assert got["H5"].comparisons[0].block == 1 and "100 vs 100 prompts" in got["H5"].comparisons[0].unit
    assert all(c.p_holm >= c.p for v in got.values() for c in v.comparisons)
    # results.json holds them as JSON, read back to the same records
    assert all(Verdict.from_json(json.loads(json.dumps(v.to_json()))) == v for v in got.values())


def test_holm_makes_a_marginal_comparison_inconclusive():
    """A difference significant on its own (p < 0.05) but not after Holm over six comparisons."""
    n_seed = next(s for s in range(200) if 0.01 < verdicts.intervals.mean_ci(
        np.random.default_rng(s).normal(0.1, 1.0, N), resamples=2000).p < 0.04)
    marginal = np.random.default_rng(n_seed).normal(0.1, 1.0, N) * 1e-3
    data = fake_data({"all": 0.01, "logits": 0.01, "first5": 0.01, "last5": 0.01, "all_f16": 0.01})
    record, arrays = data("logits")

    def patched(gid: str):
        if gid != "logits":
            return data(gid)
        return record, dict(arrays, kld=data("all")[1]["kld"] - marginal)

    h1 = by_id(verdicts.family("m", patched, resamples=2000))["H1"].comparisons[0]
    assert h1.p < 0.05 <= h1.p_holm and h1.verdict == "inconclusive"


def test_sweep_top_against_the_runner_up():
    clear = fake_data({"layer00": 0.001, "layer01": 0.005, "layer02": 0.002})
    top = verdicts.sweep_top(clear, 3)
    assert (top.top, top.runner_up, top.distinguishable) == (1, 2, True)
    x = np.random.default_rng(3).exponential(1e-3, N)
    tie = {"layer00": x, "layer01": np.random.default_rng(4).permutation(x), "layer02": x * 0.1}
    close = verdicts.sweep_top(lambda gid: ({"tokens": {"kld_mean": float(tie[gid].mean())}}, {"kld": tie[gid]}), 3)
    assert {close.top, close.runner_up} == {0, 1} and close.distinguishable is False
    assert close.difference_ci.lo < 0 < close.difference_ci.hi


def test_recorded_verdicts_round_trip_in_parallel(tmp_path, monkeypatch):
    monkeypatch.setattr(verdicts, "RECORDED_DIR", tmp_path / "verdicts")
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path / "cache"))
    assert verdicts.recorded_verdicts("m") == {}
    fam = verdicts.family("m", fake_data({"all": 0.01, "logits": 0.001, "first5": 0.002, "last5": 0.004,
                                          "all_f16": 0.01}), resamples=500)
    with ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda v: verdicts.record_verdict("m", v, "buildkey"), fam))
    got = verdicts.recorded_verdicts("m")
    assert {h: r["verdict"] for h, r in got.items()} == {v.hypothesis: v.verdict for v in fam}
    assert got["H1"]["build"] == "buildkey" and "Holm p" in got["H1"]["figures"]
    assert json.loads((tmp_path / "verdicts" / "m.json").read_text())["family_level"] == 0.05


def test_malformed_record_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(verdicts, "RECORDED_DIR", tmp_path)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m.json are malformed .* re-record with `?pytest tests/experiments"):
        verdicts.recorded_verdicts("m")


# across models: names say nothing, the GGUF metadata (arch, weight type) decides ---------------

FOUR = {"m1": {"arch": "llama", "weight_type": "Q4_1"}, "m2": {"arch": "llama", "weight_type": "F32"},
        "m3": {"arch": "gemma3", "weight_type": "Q4_K_M"}, "m4": {"arch": "gemma3", "weight_type": "F32"}}


def across(recorded: dict[str, dict[str, str]], models: dict = FOUR) -> dict[str, dict]:
    return {a.hypothesis: a.to_json() for a in verdicts.across_models(models, recorded)}


def test_weight_format_groups_every_quantized_type():
    assert [verdicts.weight_format(t) for t in ("Q4_1", "Q4_K_M", "IQ2_XS", "TQ1_0", "F32", "F16", "BF16")] == \
        ["quantized"] * 4 + ["F32", "F16", "BF16"]


def test_across_models_each_finding():
    recorded = {  # per model: H1 same, H2 weight format, H3 architecture, H4 both, H5 on m1 only
        "m1": {"H1": "holds", "H2": "holds", "H3": "holds", "H4": "holds", "H5": "refuted"},
        "m2": {"H1": "holds", "H2": "refuted", "H3": "holds", "H4": "refuted"},
        "m3": {"H1": "holds", "H2": "holds", "H3": "inconclusive", "H4": "refuted"},
        "m4": {"H1": "holds", "H2": "refuted", "H3": "inconclusive", "H4": "refuted"},
    }
    got = across(recorded)
    assert {h: a["finding"] for h, a in got.items()} == {
        "H1": "same", "H2": "weight format", "H3": "architecture", "H4": "weight format and architecture",
        "H5": "too few"}
    assert got["H1"]["compared"] == {"weight format": 2, "architecture": 2}  # m1-m4 and m2-m3 differ in both
    assert got["H2"]["differs"] == {"weight format": [["m1", "m2"], ["m3", "m4"]], "architecture": []}
    assert got["H3"]["differs"] == {"weight format": [], "architecture": [["m1", "m3"], ["m2", "m4"]]}
    assert got["H4"]["differs"] == {"weight format": [["m1", "m2"]], "architecture": [["m1", "m3"]]}
    assert got["H5"]["verdicts"] == {"m1": "refuted"} and got["H5"]["unrecorded"] == ["m2", "m3", "m4"]
    assert got["H2"]["formats"] == {"m1": "quantized", "m2": "F32", "m3": "quantized", "m4": "F32"}


def test_across_models_confounded_and_partly_recorded():
    """Two models that differ in both architecture and weight format cannot say which one matters."""
    got = across({"m1": {"H1": "holds"}, "m4": {"H1": "refuted"}})["H1"]
    assert got["finding"] == "confounded" and got["compared"] == {"weight format": 0, "architecture": 0}
    assert got["unrecorded"] == ["m2", "m3"]
    assert across({"m1": {"H1": "holds"}, "m2": {"H1": "refuted"}, "m3": {"H1": "holds"}})["H1"]["finding"] == \
        "weight format"


def test_across_models_reads_metadata_not_names():
    """Names that say "same architecture, Q4_1 vs F32", metadata that say "another architecture, both
    quantized": what differs is the architecture; with metadata that agree with the names, the format."""
    named = {"smollm2-q4_1": {"arch": "llama", "weight_type": "Q4_1"},
             "smollm2-f32": {"arch": "gemma3", "weight_type": "Q8_0"}}
    recorded = {"smollm2-q4_1": {"H1": "holds"}, "smollm2-f32": {"H1": "refuted"}}
    got = across(recorded, named)["H1"]
    assert got["finding"] == "architecture" and got["differs"]["architecture"] == [["smollm2-q4_1", "smollm2-f32"]]
    named["smollm2-f32"] = {"arch": "llama", "weight_type": "F32"}
    assert across(recorded, named)["H1"]["finding"] == "weight format"


def test_record_command_carries_the_settings_that_chose_the_models(monkeypatch):
    for env in ("FQ_EXPERIMENT_MODELS", "FQ_MODEL", "FQ_CORPUS"):
        monkeypatch.delenv(env, raising=False)
    assert verdicts.record_command() == verdicts.RECORD_COMMAND
    monkeypatch.setenv("FQ_EXPERIMENT_MODELS", "user,smollm2-f32")
    monkeypatch.setenv("FQ_MODEL", "/my models/tiny.gguf")
    monkeypatch.setenv("FQ_CORPUS", "/texts/a.txt")
    assert verdicts.record_command() == ("FQ_EXPERIMENT_MODELS=user,smollm2-f32 FQ_MODEL='/my models/tiny.gguf' "
                                         f"FQ_CORPUS=/texts/a.txt {verdicts.RECORD_COMMAND}")
