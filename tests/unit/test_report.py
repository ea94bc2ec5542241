"""The report: index.md sections, valid PNG plots, every table figure read from the results file,
verdicts, generation tables, skipped plots and clear errors for a bad results file."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from harness.cache import HarnessError
from harness.report import render

FIXTURE = Path(__file__).parent.parent / "fixtures" / "results_small.json"
SECTIONS = ["# ", "## Provenance", "## How to read this report", "## Experiment matrix", "## Hypotheses",
            "## Verdicts across models", "## Task sensitivity", "## Layer sensitivity", "## Error accumulation",
            "## Activation distribution", "## Group comparison", "## Dose response", "## Generation"]
PLOTS = ["layer_sensitivity.png", "error_accumulation.png", "ffn_norm_hist.png", "groups.png", "dose_response.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def g3(x: float) -> str:
    return f"{x:.3g}"


@pytest.fixture(scope="module")
def data() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    index = render(FIXTURE, out)
    assert index == out / "index.md"
    return out


def write(tmp_path: Path, results: dict, name: str = "results_in.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return path


def section(text: str, title: str) -> str:
    """The text of one `## title` section (up to the next `## ` heading)."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def matrix_row(text: str, model: str, group: str) -> list[str]:
    part = section(text, "Experiment matrix")
    part = part[part.index(f"### {model}\n"):]
    part = part[:part.find("\n### ", 1)] if "\n### " in part[1:] else part
    line = next(line for line in part.splitlines() if line.startswith(f"| `{group}` |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


MATRIX_HEADER = ["group", "kind", "ffn_norm fq", "logits fq", "layers", "type", "fq sites", "KLD mean [95 % CI]",
                 "KLD p99", "top-1 agreement [95 % CI]", "PPL ratio [95 % CI]", "Δp RMS", "greedy match"]


# --------------------------------------------------------------------------------------------- structure


def test_index_has_the_sections_in_order(rendered: Path) -> None:
    text = (rendered / "index.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "sections out of order"
    assert text.startswith("# ")
    assert "results.json" in text.strip().splitlines()[-1], "the report must end with the results path"


def test_results_are_copied(rendered: Path) -> None:
    assert (rendered / "results.json").read_bytes() == FIXTURE.read_bytes()


def test_every_plot_is_a_valid_png(rendered: Path) -> None:
    import matplotlib.image

    text = (rendered / "index.md").read_text()
    listed = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(listed) == sorted(PLOTS)
    for name in listed:
        path = rendered / name
        blob = path.read_bytes()
        assert len(blob) > 1000, name
        assert blob[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, f"{name} is blank"


def test_progress_goes_to_stderr(tmp_path: Path, capsys) -> None:
    render(FIXTURE, tmp_path)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "[report] plot layer_sensitivity.png" in captured.err


def test_tables_are_well_formed(rendered: Path) -> None:
    """Free text (generated text with | and line breaks) must not break a table row."""
    lines = (rendered / "index.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|"):
            assert line.endswith("|"), f"line {i + 1} broken: {line!r}"
    # every row of a table has as many unescaped pipes as its header
    block: list[int] = []
    for line in lines + [""]:
        if line.startswith("|"):
            block.append(len(re.findall(r"(?<!\\)\|", line)))
        elif block:
            assert len(set(block)) == 1, f"ragged table ending before {line!r}: {block}"
            block = []


# ------------------------------------------------------------------------------------ figures come from the file


def test_matrix_rows_show_the_files_values(rendered: Path, data: dict) -> None:
    text = (rendered / "index.md").read_text()
    checked = 0
    for g in data["groups"]:
        if g["kind"] not in ("design", "control"):
            continue
        row = dict(zip(MATRIX_HEADER, matrix_row(text, g["model"], g["group"]), strict=True))
        t = g["tokens"]
        assert row["KLD mean [95 % CI]"] == f"{g3(t['kld_mean'])} [{g3(t['kld_ci'][1])}, {g3(t['kld_ci'][2])}]"
        assert row["KLD p99"] == g3(t["kld_p99"])
        assert row["Δp RMS"] == g3(t["dp_rms"])
        assert row["PPL ratio [95 % CI]"].startswith(f"{t['ppl_ratio']:.4f} [")
        assert row["PPL ratio [95 % CI]"].endswith(f"{math.exp(t['ln_ppl_ratio_ci'][2]):.4f}]")
        assert row["fq sites"] == str(g["fake_quant_sites"])
        greedy = [e["match_rate"] for e in g["generation"] if e["sampling"] == "greedy"]
        assert row["greedy match"] == f"{sum(greedy) / len(greedy) * 100:.3g} %"
        checked += 1
    assert checked == 2 * 7


def test_matrix_columns_follow_the_rules(rendered: Path) -> None:
    text = (rendered / "index.md").read_text()
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-f32", "all_logits")))
    assert (row["ffn_norm fq"], row["logits fq"], row["layers"], row["type"]) == ("yes", "yes", "all", "bf16")
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-q4_1", "first5")))
    assert (row["ffn_norm fq"], row["logits fq"], row["layers"]) == ("yes", "no", "0-1")
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-q4_1", "all_f16")))
    assert row["type"] == "f16"
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-q4_1", "logits")))
    assert (row["ffn_norm fq"], row["logits fq"], row["layers"], row["kind"]) == ("no", "yes", "–", "control")


def test_a_changed_value_changes_the_table(tmp_path: Path, data: dict) -> None:
    changed = copy.deepcopy(data)
    group = next(g for g in changed["groups"] if g["model"] == "smollm2-f32" and g["group"] == "all")
    before = group["tokens"]["kld_mean"]
    group["tokens"]["kld_mean"] = 0.0987654
    group["tokens"]["kld_p99"] = 0.654321
    text = render(write(tmp_path, changed), tmp_path / "out").read_text()
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-f32", "all")))
    assert row["KLD mean [95 % CI]"].startswith("0.0988 [")
    assert not row["KLD mean [95 % CI]"].startswith(g3(before))
    assert row["KLD p99"] == "0.654"
    # the other model's row is untouched
    other = next(g for g in data["groups"] if g["model"] == "smollm2-q4_1" and g["group"] == "all")
    row = dict(zip(MATRIX_HEADER, matrix_row(text, "smollm2-q4_1", "all")))
    assert row["KLD mean [95 % CI]"].startswith(g3(other["tokens"]["kld_mean"]) + " [")


def test_provenance_and_tables_quote_the_file(rendered: Path, data: dict) -> None:
    text = (rendered / "index.md").read_text()
    prov = section(text, "Provenance")
    p = data["provenance"]
    assert p["build"]["patch_sha256"][:12] in prov and p["build"]["patch_sha256"] not in prov
    assert p["build"]["llama_cpp_commit"] in prov
    assert p["build"]["flags"] in prov and p["build"]["compiler"] in prov and p["build"]["key"] in prov
    assert p["corpus"]["sha256"][:12] in prov and p["corpus"]["name"] in prov
    assert p["cpu"] in prov and p["date"] in prov and p["python"] in prov
    assert f"{p['group_compute_seconds'] / p['group_wall_seconds'] * 100:.3g} %" in prov
    m = p["matrix"]
    assert str(m["main_chunks"] * (m["n_ctx"] - 1 - m["scored_from"])) in prov
    for name, info in data["models"].items():
        assert f"| {name} | `{info['path']}` | `{info['sha256'][:12]}` | {info['n_layer']} |" in prov
        assert f"| {info['n_vocab']} | {info['arch']} | {info['weight_type']} |" in prov

    tasks = section(text, "Task sensitivity")
    for g in data["groups"]:
        if g["group"] == "all":
            lp = g["tasks"]["answer_logprob"]
            assert f"| {g['model']} | {g3(g['tasks']['arithmetic']['kld_mean'])} |" in tasks
            assert f"{g3(lp['delta_ci'][0])} [{g3(lp['delta_ci'][1])}, {g3(lp['delta_ci'][2])}]" in tasks

    layers = section(text, "Layer sensitivity")
    for g in data["groups"]:
        if g["kind"] == "sweep":
            ci = g["tokens"]["kld_ci"]
            assert f"{g3(g['tokens']['kld_mean'])} [{g3(ci[1])}, {g3(ci[2])}]" in layers

    dose = section(text, "Dose response")
    for points in data["dose_response"].values():
        for pt in points:
            ci = pt["kld_ci"]
            assert f"{g3(ci[0])} [{g3(ci[1])}, {g3(ci[2])}]" in dose


# --------------------------------------------------------------------------------------------- verdicts


def test_verdict_table_shows_every_verdict(rendered: Path, data: dict) -> None:
    """One row per hypothesis, one column per model (named with its GGUF's arch and weight type),
    then the figures of every comparison, one row per hypothesis and model."""
    hyp = section((rendered / "index.md").read_text(), "Hypotheses")
    assert {v["verdict"] for v in data["verdicts"]} == {"holds", "refuted", "inconclusive"}
    header = next(line for line in hyp.splitlines() if line.startswith("| id | statement |"))
    models = list(dict.fromkeys(v["model"] for v in data["verdicts"]))
    assert header == "| id | statement | " + " | ".join(
        f"{m} ({data['models'][m]['arch']}, {data['models'][m]['weight_type']})" for m in models) + " |"
    for v in data["verdicts"]:
        row = next(line for line in hyp.splitlines() if line.startswith(f"| {v['hypothesis']} | ") and "**" in line)
        recorded = ("as recorded" if v["recorded"] == v["verdict"] else f"recorded {v['recorded']}"
                    if v["recorded"] else "none recorded")
        assert row.split(" | ")[2 + models.index(v["model"])].strip(" |") == f"**{v['verdict']}** ({recorded})"
        row = next(line for line in hyp.splitlines() if line.startswith(f"| {v['hypothesis']} | {v['model']} |"))
        for c in v["comparisons"]:
            assert f"difference {g3(c['difference'])} \\[{g3(c['ci95'][0])}, {g3(c['ci95'][1])}\\]" in row
            assert f"Holm p {c['p_holm']:.2g}" in row
            assert g3(c["mean_a"]) in row and g3(c["mean_b"]) in row


def test_hypothesis_sentences_follow_the_verdicts(rendered: Path) -> None:
    hyp = section((rendered / "index.md").read_text(), "Hypotheses")
    sentences = {m.group(1): m.group(0) for m in re.finditer(r"^\*\*(H\d)\*\*.*$", hyp, re.M)}
    assert set(sentences) == {"H1", "H2", "H3", "H4", "H5"}
    assert "differs between models" in sentences["H1"]
    assert "inconclusive on smollm2-q4_1" in sentences["H1"] and "holds on smollm2-f32" in sentences["H1"]
    assert "holds on both models" in sentences["H2"]
    assert "as recorded (holds)" in sentences["H2"]
    assert "smollm2-q4_1 recorded holds, measured inconclusive" in sentences["H1"]
    assert "refuted on smollm2-q4_1" in sentences["H5"]


def test_sentence_when_a_verdict_changes(tmp_path: Path, data: dict) -> None:
    changed = copy.deepcopy(data)
    for v in changed["verdicts"]:
        if v["hypothesis"] == "H1":
            v["verdict"] = v["comparisons"][0]["verdict"] = "refuted"
    hyp = section(render(write(tmp_path, changed), tmp_path / "out").read_text(), "Hypotheses")
    line = next(line for line in hyp.splitlines() if line.startswith("**H1**"))
    assert "is refuted on both models" in line
    assert "| H1 | smollm2-q4_1 |" in hyp and "**refuted** (recorded holds)" in hyp


FOUR_MODELS = {"smollm2-q4_1": ("llama", "Q4_1"), "smollm2-f32": ("llama", "F32"),
               "gemma3-q4_k_m": ("gemma3", "Q4_K_M"), "gemma3-f32": ("gemma3", "F32")}


def four_models(data: dict, recorded: dict[str, dict[str, str]]) -> dict:
    """The fixture with two more models and `across_models` as harness.verdicts computes it."""
    from harness.verdicts import across_models

    out = copy.deepcopy(data)
    for name, (arch, weight_type) in FOUR_MODELS.items():
        out["models"].setdefault(name, dict(out["models"]["smollm2-f32"], label=name))
        out["models"][name].update(arch=arch, weight_type=weight_type)
    out["across_models"] = [a.to_json() for a in across_models(out["models"], recorded)]
    return out


def test_verdicts_across_models(tmp_path: Path, data: dict) -> None:
    recorded = {  # H1 same, H2 weight format (masking), H3 architecture, H4 both, H5 undetermined
        "smollm2-q4_1": {"H1": "holds", "H2": "inconclusive", "H3": "holds", "H4": "holds", "H5": "holds"},
        "smollm2-f32": {"H1": "holds", "H2": "holds", "H3": "holds", "H4": "refuted"},
        "gemma3-q4_k_m": {"H1": "holds", "H2": "inconclusive", "H3": "refuted", "H4": "refuted"},
        "gemma3-f32": {"H1": "holds", "H2": "holds", "H3": "refuted", "H4": "refuted", "H5": "refuted"},
    }
    text = section(render(write(tmp_path, four_models(data, recorded)), tmp_path / "out").read_text(),
                   "Verdicts across models")
    sentences = {m.group(1): m.group(0) for m in re.finditer(r"^\*\*(H\d)\*\*.*$", text, re.M)}
    assert "(Q4_1, Q4_K_M) counts as one format" in text
    assert "holds on all 4 models with a recorded verdict" in sentences["H1"]
    assert "2 weight-format and 2 architecture pairs compared" in sentences["H1"]
    assert "depends neither on the weight format nor on the architecture" in sentences["H1"]
    assert sentences["H2"].count("depends on the weight format (") == 1 and "architecture (" not in sentences["H2"]
    assert "llama: smollm2-q4_1 (Q4_1) inconclusive vs smollm2-f32 (F32) holds" in sentences["H2"]
    assert "gemma3: gemma3-q4_k_m (Q4_K_M) inconclusive vs gemma3-f32 (F32) holds" in sentences["H2"]
    assert "masking" in sentences["H2"] and "masking" not in sentences["H3"]
    assert "depends on the architecture (quantized weights: smollm2-q4_1 (llama) holds vs gemma3-q4_k_m " \
           "(gemma3) refuted; F32 weights: smollm2-f32 (llama) holds vs gemma3-f32 (gemma3) refuted)" in sentences["H3"]
    assert "depends on the weight format (" in sentences["H4"] and " and on the architecture (" in sentences["H4"]
    assert "what it depends on is open" in sentences["H5"]
    assert "Not recorded, left out: smollm2-f32, gemma3-q4_k_m" in sentences["H5"] and "Not recorded" not in \
        sentences["H1"]


def test_verdicts_across_models_follow_the_metadata(tmp_path: Path, data: dict) -> None:
    """Names that promise a Q4 and an F32 of one architecture, metadata that say otherwise."""
    recorded = {"smollm2-q4_1": {"H1": "holds"}, "smollm2-f32": {"H1": "refuted"}}
    results = four_models(data, recorded)
    results["models"]["smollm2-f32"]["arch"] = "gemma3"
    results["models"]["smollm2-f32"]["weight_type"] = "Q8_0"
    from harness.verdicts import across_models

    results["across_models"] = [a.to_json() for a in across_models(results["models"], recorded)]
    text = section(render(write(tmp_path, results), tmp_path / "out").read_text(), "Verdicts across models")
    line = next(line for line in text.splitlines() if line.startswith("**H1**"))
    assert "depends on the architecture (quantized weights: smollm2-q4_1 (llama) holds vs smollm2-f32 (gemma3) " \
           "refuted)" in line and "weight format (" not in line


def test_same_verdict_claims_only_what_was_compared(tmp_path: Path, data: dict) -> None:
    """Two recorded models of one architecture: the weight format is compared, the architecture is not."""
    results = four_models(data, {"smollm2-q4_1": {"H1": "holds"}, "smollm2-f32": {"H1": "holds"}})
    text = section(render(write(tmp_path, results), tmp_path / "out").read_text(), "Verdicts across models")
    line = next(line for line in text.splitlines() if line.startswith("**H1**"))
    assert "holds on both models with a recorded verdict (smollm2-q4_1, smollm2-f32; 1 weight-format and 0 " \
           "architecture pairs compared): it does not depend on the weight format; no two of them differ in " \
           "architecture alone." in line
    assert "Not recorded, left out: gemma3-q4_k_m, gemma3-f32" in line


def test_results_without_across_models(rendered: Path) -> None:
    text = section((rendered / "index.md").read_text(), "Verdicts across models")
    assert "The results hold no comparison of verdicts across models" in text


def test_method_and_family_level_are_stated(rendered: Path, data: dict) -> None:
    text = (rendered / "index.md").read_text()
    how = section(text, "How to read this report")
    assert "circular block bootstrap" in how and "Politis and White" in how and "Holm-adjusted" in how
    assert "20000 resamples" in how and "family-wise error rate is 0.05" in how and "3–9 tokens" in how
    assert "smollm2-q4_1 has Q4_1 weights" in how and "smollm2-f32 has F32 weights" in how
    assert "Holm correction over each model's comparisons at family-wise level 0.05" in section(text, "Provenance")
    hyp = section(text, "Hypotheses")
    assert "family-wise level 0.05" in hyp and "No verdicts are recorded for" not in hyp


def test_weight_type_comes_from_the_file_not_the_name(tmp_path: Path, data: dict) -> None:
    renamed = copy.deepcopy(data)
    renamed["models"]["smollm2-q4_1"]["weight_type"] = "F32"  # the name says q4, the GGUF says F32
    how = section(render(write(tmp_path, renamed), tmp_path / "out").read_text(), "How to read this report")
    assert "smollm2-q4_1 has F32 weights" in how and "Q4_1 weights" not in how


def test_top_layer_against_runner_up(rendered: Path) -> None:
    layers = section((rendered / "index.md").read_text(), "Layer sensitivity")
    assert "smollm2-q4_1: layer 0 (0.0021) vs layer 1 (0.0015), paired difference 0.0006 [0.0002, 0.001]: " \
           "distinguishable from the runner-up" in layers
    assert "smollm2-f32: layer 3 (1.1e-05) vs layer 2 (1e-05)" in layers and "**not** distinguishable" in layers


def test_unrecorded_model_says_how_to_record(tmp_path: Path, data: dict) -> None:
    fresh = copy.deepcopy(data)
    for v in fresh["verdicts"]:
        v["recorded"] = None
    hyp = section(render(write(tmp_path, fresh), tmp_path / "out").read_text(), "Hypotheses")
    assert "No verdicts are recorded for smollm2-f32, smollm2-q4_1" in hyp
    assert "`pytest tests/experiments -n 2 --snapshot-update`" in hyp


# --------------------------------------------------------------------------------------------- generation


def test_generation_marks_divergence(rendered: Path, data: dict) -> None:
    gen = section((rendered / "index.md").read_text(), "Generation")
    assert "A \\| B table: ↵ \\<row\\> one \\*two\\*" in gen  # escaped baseline text, line break shown
    n_diverged = n_identical = 0
    for g in data["groups"]:
        if g["kind"] not in ("design", "control") or not g["rules"]:
            continue
        for e in g["generation"]:
            if e["first_divergence"] is None:
                n_identical += 1
            else:
                n_diverged += 1
                assert f"first divergence at token {e['first_divergence']}" in gen
    assert gen.count("first divergence at token") == n_diverged
    assert gen.count("| identical to baseline |") == n_identical
    assert "| `design_seed42` | seed 42 |" in gen


# --------------------------------------------------------------------------------------------- skipping and errors


def test_absent_data_skip_their_plots(tmp_path: Path, data: dict) -> None:
    reduced = copy.deepcopy(data)
    reduced["groups"] = [g for g in reduced["groups"] if g["kind"] != "sweep"]
    del reduced["dose_response"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "dose_response.png").write_bytes(b"stale")
    text = render(write(tmp_path, reduced), out).read_text()
    assert "Plot skipped: the results hold no groups of kind `sweep`" in section(text, "Layer sensitivity")
    assert "Plot skipped" in section(text, "Dose response")
    assert not (out / "layer_sensitivity.png").exists() and not (out / "dose_response.png").exists()
    assert (out / "groups.png").read_bytes()[:8] == PNG_SIGNATURE


def test_render_in_place(tmp_path: Path) -> None:
    """Rendering the results.json that already lies in the output directory leaves it as it is."""
    source = tmp_path / "results.json"
    source.write_bytes(FIXTURE.read_bytes())
    render(source, tmp_path)
    assert source.read_bytes() == FIXTURE.read_bytes()


def test_missing_results_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "results.json"
    with pytest.raises(HarnessError, match="not found") as info:
        render(missing, tmp_path / "out")
    assert str(missing) in str(info.value)


def test_results_without_groups(tmp_path: Path, data: dict) -> None:
    broken = {k: v for k, v in data.items() if k != "groups"}
    path = write(tmp_path, broken)
    with pytest.raises(HarnessError, match="missing key 'groups'") as info:
        render(path, tmp_path / "out")
    assert str(path) in str(info.value)


def test_group_without_a_needed_key(tmp_path: Path, data: dict) -> None:
    broken = copy.deepcopy(data)
    del broken["groups"][3]["tokens"]["kld_ci"]
    path = write(tmp_path, broken)
    with pytest.raises(HarnessError, match="kld_ci") as info:
        render(path, tmp_path / "out")
    assert str(path) in str(info.value)


def test_verdict_with_an_unknown_key(tmp_path: Path, data: dict) -> None:
    broken = copy.deepcopy(data)
    broken["verdicts"][1]["comparisons"][0]["p_adjusted"] = 0.1
    path = write(tmp_path, broken)
    with pytest.raises(HarnessError, match=r"verdicts\[1\]\.comparisons\[0\]: Comparison has no field 'p_adjusted'"):
        render(path, tmp_path / "out")


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("{ not json")
    with pytest.raises(HarnessError, match="not readable JSON"):
        render(path, tmp_path / "out")


def test_provenance_names_the_backend_and_devices(tmp_path: Path, data: dict) -> None:
    """Results name the backend they ran on; older results (no backend recorded) say they are the CPU's."""
    assert "- Backend: cpu (not recorded: results written before the backend was)" in \
        render(write(tmp_path, data, "old.json"), tmp_path / "old-out").read_text()
    gpu = copy.deepcopy(data)
    gpu["provenance"]["backend"] = {"name": "cuda", "gpu_layers": 999, "devices": [
        {"name": "CUDA0", "description": "NVIDIA H200", "type": "GPU", "memory_total_mib": 143771.0},
        {"name": "CPU", "description": "AMD EPYC", "type": "CPU", "memory_total_mib": 131072.0}]}
    text = render(write(tmp_path, gpu, "gpu.json"), tmp_path / "gpu-out").read_text()
    assert ("- Backend: cuda, 999 layers offloaded; devices CUDA0 (NVIDIA H200, GPU, 140.4 GiB), "
            "CPU (AMD EPYC, CPU, 128.0 GiB)") in section(text, "Provenance")
