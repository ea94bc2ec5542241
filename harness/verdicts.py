"""Hypotheses → verdicts, and the results file that carries every group's metrics to the report.

A comparison "group a hurts more than group b" is the paired moving-block bootstrap 95 % CI of
the per-token KLD difference (same tokens, same baseline): above 0 holds, below 0 refuted,
straddling 0 inconclusive. H5 compares per-prompt mean KLD of arithmetic and text prompts
(independent samples) with a two-sample bootstrap.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness import matrix
from harness.cache import cpu_model
from harness.metrics import Verdict, decide, mean_ci, paired_bootstrap_ci

RESULTS_ENV = "FQ_RESULTS"
DEFAULT_RESULTS = Path("report") / "results.json"

GroupData = Callable[[str], tuple[dict, dict[str, np.ndarray]]]  # group id -> (record, arrays)


def two_sample_ci(a: np.ndarray, b: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap (estimate, lo, hi) of mean(a) - mean(b) for independent samples."""
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), (n_resamples, len(a)))].mean(axis=1)
    mb = b[rng.integers(0, len(b), (n_resamples, len(b)))].mean(axis=1)
    lo, hi = np.quantile(ma - mb, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def combine(verdicts: list[str]) -> str:
    """Every comparison must hold; one refuted refutes; otherwise inconclusive."""
    if all(v == Verdict.HOLDS for v in verdicts):
        return Verdict.HOLDS.value
    if any(v == Verdict.REFUTED for v in verdicts):
        return Verdict.REFUTED.value
    return Verdict.INCONCLUSIVE.value


def evaluate(hypothesis: matrix.Hypothesis, model: str, data: GroupData) -> dict:
    """The verdict of one hypothesis on one model, with the figures that decided it."""
    comparisons = []
    for a, b in hypothesis.comparisons:
        rec_a, arr_a = data(a)
        if hypothesis.task:
            x, y = arr_a["task_kld_arithmetic"], arr_a["task_kld_text"]
            est, lo, hi = two_sample_ci(x, y)
            label_a, label_b, unit = f"{a}: arithmetic", f"{a}: text", "per-prompt mean KLD"
            mean_a, mean_b = float(x.mean()), float(y.mean())
        else:
            rec_b, arr_b = data(b)
            est, lo, hi = paired_bootstrap_ci(arr_a["kld"], arr_b["kld"], block=matrix.BOOTSTRAP_BLOCK)
            label_a, label_b, unit = a, b, "per-token KLD"
            mean_a, mean_b = rec_a["tokens"]["kld_mean"], rec_b["tokens"]["kld_mean"]
        comparisons.append({"a": label_a, "b": label_b, "unit": unit, "mean_a": mean_a, "mean_b": mean_b,
                            "difference": est, "ci95": [lo, hi], "verdict": decide(lo, hi).value})
    return {"hypothesis": hypothesis.id, "model": model, "statement": hypothesis.statement,
            "comparisons": comparisons, "verdict": combine([c["verdict"] for c in comparisons]),
            "expected": matrix.EXPECTED.get((hypothesis.id, model))}


def figures(verdict: dict) -> str:
    """One line with the measured figures, for xfail reasons and the report."""
    return "; ".join(f"{c['a']} {c['mean_a']:.4g} vs {c['b']} {c['mean_b']:.4g}: difference {c['difference']:.3g} "
                     f"[{c['ci95'][0]:.3g}, {c['ci95'][1]:.3g}] {c['verdict']}" for c in verdict["comparisons"])


def dose_response(data: GroupData) -> list[dict]:
    """Mean KLD (95 % CI) against the scale of ffn_norm bf16 fake quantization on the sweep
    slice: 0 is the baseline, 1 the `all` group restricted to the same tokens."""
    points = [{"scale": 0.0, "kld_ci": [0.0, 0.0, 0.0]}]
    n = None
    for scale in matrix.SCALES:
        record, arrays = data(matrix.scale_id(scale))
        n = len(arrays["kld"])
        points.append({"scale": record["scale"], "kld_ci": record["tokens"]["kld_ci"]})
    full = data("all")[1]["kld"][:n]
    points.append({"scale": 1.0, "kld_ci": list(mean_ci(full, block=matrix.BOOTSTRAP_BLOCK))})
    return points


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV, DEFAULT_RESULTS))


def write_results(sessions: dict[str, object], build_fingerprint: dict, corpus: dict,
                  group_ids: list[str] | None = None, path: Path | None = None) -> Path:
    """Assemble every group of every model (from the runner's cache; `group_ids` limits it to
    those, e.g. one `-k first5` run) with the verdicts and dose response their groups allow,
    into the results file the report reads."""
    groups, verdicts, models, dose = [], [], {}, {}
    for name, session in sessions.items():
        models[name] = {"path": str(session.file.path), "sha256": session.file.sha256,
                        "n_layer": session.model.n_layer, "n_embd": session.model.n_embd,
                        "n_vocab": session.model.n_vocab}
        chosen = [g for g in session.groups if group_ids is None or g in group_ids]
        groups += [session.run(group_id)[0] for group_id in chosen]
        verdicts += [evaluate(h, name, session.run) for h in matrix.HYPOTHESES
                     if all(g in chosen for pair in h.comparisons for g in pair)]
        if all(g in chosen for g in ("all", *map(matrix.scale_id, matrix.SCALES))):
            dose[name] = dose_response(session.run)
    compute = sum(g["timing"]["compute_s"] for g in groups)
    wall = sum(g["timing"]["wall_s"] for g in groups)
    results = {
        "provenance": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version(), "build": build_fingerprint, "corpus": corpus,
            "matrix": {"n_ctx": matrix.N_CTX, "scored_from": matrix.SCORED_FROM, "main_chunks": matrix.MAIN_CHUNKS,
                       "sweep_chunks": matrix.SWEEP_CHUNKS, "bootstrap_block": matrix.BOOTSTRAP_BLOCK,
                       "generation_tokens": matrix.GENERATION_TOKENS, "seed": matrix.SEED},
            "group_wall_seconds": round(wall, 1), "group_compute_seconds": round(compute, 1),
        },
        "models": models, "groups": groups, "verdicts": verdicts, "dose_response": dose,
    }
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return path
