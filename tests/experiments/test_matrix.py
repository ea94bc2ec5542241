"""The experiment matrix: every group on every model (`pytest -k first5` runs one group), the
hypotheses as tests checked against the verdicts recorded per model, the verdict table as a
snapshot, and the verdicts' independence of the bootstrap seed."""

from __future__ import annotations

import pytest

from harness import matrix
from harness.records import Verdict
from harness.reference import parse_layers
from harness.verdicts import family, figures, record_command, record_verdict, recorded_path, recorded_verdicts

pytestmark = [pytest.mark.native, pytest.mark.experiment]

MODELS = matrix.experiment_models()
LABELS = {name: matrix.model_label(name) for name in MODELS}
CASES = [(group, model) for model, n_layer in sorted(MODELS.items()) for group in matrix.groups(n_layer)]
GENERATION_CASES = [(g.id, m) for g, m in CASES if g.generation]
OTHER_CASES = [(g.id, m) for g, m in CASES if not g.generation]
SEEDS = range(1, 6)  # five seeds besides the default one (0)


def ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{a}-{LABELS[m]}" for a, m in cases]


def expected_sites(group: matrix.Group, n_layer: int) -> int:
    """One fake-quantized tensor per selected layer (ffn_norm) or one for the logits."""
    total = 0
    for rule in group.rules:
        layers = parse_layers(rule.layers, n_layer)
        total += 1 if rule.target == "result_output" else (n_layer if layers is None else len(layers))
    return total


def check_measurement(session, group_id: str) -> dict:
    """What every group must show, on any build: its token and site counts, and either the exact
    baseline or a measurable change (a fake quantization that did nothing would give KLD 0)."""
    group = session.groups[group_id]
    record, arrays = session.run(group_id)
    tokens = record["tokens"]
    assert tokens["n_tokens"] == len(arrays["kld"]) == group.chunks * (matrix.N_CTX - 1 - matrix.SCORED_FROM)
    assert record["fake_quant_sites"] == expected_sites(group, session.model.n_layer)
    if group_id == "baseline":
        assert tokens["kld_max"] == 0.0 and tokens["top1_agreement"] == 1.0 and tokens["ppl_ratio"] == 1.0
    else:  # per-token KLD is never negative: a mean above 0 means some token moved
        assert tokens["kld_mean"] > 0.0 and tokens["kld_max"] > 0.0
    if group.tasks:
        assert len(arrays["task_kld_arithmetic"]) >= 100 and len(arrays["task_kld_text"]) >= 100
    return record


@pytest.mark.parametrize(("group_id", "model"), GENERATION_CASES, ids=ids(GENERATION_CASES))
def test_group(sessions, snapshot_json, group_id, model):
    record = check_measurement(sessions[model], group_id)
    if group_id == "baseline":  # a re-run against the generations recorded with the baseline
        assert all(g["first_divergence"] is None for g in record["generation"]), record["generation"]
    snapshot_json({
        "model": LABELS[model], "group": group_id, "fake_quant_sites": record["fake_quant_sites"],
        "generation": [{k: g[k] for k in ("id", "sampling", "tokens", "text", "first_divergence")}
                       for g in record["generation"]],
    }, model)


@pytest.mark.parametrize(("group_id", "model"), OTHER_CASES, ids=ids(OTHER_CASES))
def test_sweep_group(sessions, group_id, model):
    """Per-layer and scale sweep points: measured and checked, nothing snapshotted."""
    check_measurement(sessions[model], group_id)


HYPOTHESIS_CASES = [(h.id, model) for model in sorted(MODELS) for h in matrix.HYPOTHESES]


@pytest.mark.parametrize(("hypothesis_id", "model"), HYPOTHESIS_CASES, ids=ids(HYPOTHESIS_CASES))
def test_hypothesis(families, build, request, ci, hypothesis_id, model):
    """Fails when the measured verdict differs from the recorded one, in either direction. A
    recorded "holds" is asserted; any other recorded verdict is a strict xfail whose only failing
    assertion is the hypothesis itself. --snapshot-update records the measured verdict."""
    label = LABELS[model]
    verdict = next(v for v in families[model] if v.hypothesis == hypothesis_id)
    measured = verdict.verdict
    if request.config.option.update_snapshots:
        record_verdict(label, verdict, build.fingerprint["key"])
    recorded = recorded_verdicts(label).get(hypothesis_id)
    if recorded is None:  # a new model: say what was measured and how to record it (CI=true: fail)
        message = (f"no verdict recorded for {hypothesis_id} on {label} ({recorded_path(label)}); measured "
                   f"{measured}: {figures(verdict)}. Record it with `{record_command()}`")
        if ci:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    assert measured == recorded["verdict"], (
        f"{hypothesis_id} on {label}: recorded {recorded['verdict']} ({recorded['figures']}), "
        f"measured {measured} ({figures(verdict)})")
    if measured != "holds":
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{measured}: {figures(verdict)}"))
    assert measured == "holds", f"{verdict.statement}: {figures(verdict)}"


@pytest.mark.parametrize("model", sorted(MODELS), ids=[LABELS[m] for m in sorted(MODELS)])
def test_verdict_table(families, snapshot_json, model):
    """Every verdict with its figures (3 significant digits) as one snapshot per model."""
    table = [{"hypothesis": v.hypothesis, "statement": v.statement, "verdict": v.verdict,
              "comparisons": [{"a": c.a, "b": c.b, "mean_a": f"{c.mean_a:.3g}", "mean_b": f"{c.mean_b:.3g}",
                               "difference": f"{c.difference:.3g}", "ci95": [f"{x:.3g}" for x in c.ci95],
                               "block": c.block, "p_holm": f"{c.p_holm:.2g}", "verdict": c.verdict}
                              for c in v.comparisons]}
             for v in families[model]]
    snapshot_json(table, model)


@pytest.mark.parametrize("model", sorted(MODELS), ids=[LABELS[m] for m in sorted(MODELS)])
def test_verdicts_do_not_depend_on_the_seed(sessions, families, model):
    """The verdict table (every comparison's verdict) is the same for five bootstrap seeds."""
    def table(verdicts: list[Verdict]) -> list[tuple]:
        return [(v.hypothesis, v.verdict, tuple(c.verdict for c in v.comparisons)) for v in verdicts]

    reference = table(families[model])
    for seed in SEEDS:
        assert table(family(model, sessions[model].run, seed=seed)) == reference, f"seed {seed}"
