"""Hypotheses → verdicts, the recorded verdicts they are checked against, what the recorded verdicts
depend on across models (weight format, architecture: from GGUF metadata), and the results file
that carries every group's metrics to the report.

A comparison "group a hurts more than group b" is the paired circular-block-bootstrap interval
of the per-token KLD difference (same tokens, same baseline); H5 compares the per-prompt mean KLD
of arithmetic and text prompts (independent samples). Each model's comparisons form one family:
their p-values are Holm-adjusted, and a comparison holds (refuted) when its adjusted p-value is
below intervals.FAMILY_LEVEL and the difference is positive (negative), else it is inconclusive.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
from filelock import FileLock

from harness import intervals, matrix
from harness.cache import cache_root, cpu_model
from harness.corpus import CORPUS_ENV
from harness.metrics import METRICS
from harness.models import USER_MODEL_ENV
from harness.records import (AcrossModels, Blocks, Comparison, DosePoint, Estimate, GroupRecord, SweepTop, Tasks,
                             Verdict)

RESULTS_ENV = "FQ_RESULTS"
DEFAULT_RESULTS = Path("report") / "results.json"
RECORDED_DIR = Path(__file__).resolve().parents[1] / "tests" / "snapshots" / "verdicts"
RECORD_COMMAND = "pytest tests/experiments -n 2 --snapshot-update"


def record_command() -> str:
    """RECORD_COMMAND with the settings that chose what was measured (models, user model, corpus),
    so the command records this run's models, not the default ones."""
    settings = [f"{env}={shlex.quote(os.environ[env])}" for env in (matrix.MODELS_ENV, USER_MODEL_ENV, CORPUS_ENV)
                if os.environ.get(env)]
    return " ".join([*settings, RECORD_COMMAND])

GroupData = Callable[[str], tuple[dict, dict[str, np.ndarray]]]  # group id -> (record, arrays)


def family(model: str, data: GroupData, seed: int = intervals.SEED,
           resamples: int = intervals.RESAMPLES) -> list[Verdict]:
    """The verdict of every hypothesis on one model, decided together (Holm over all their
    comparisons), each with the figures that decided it."""
    rows = []  # (hypothesis, the comparison's fields but p_holm and verdict)
    for k, (hypothesis, (a, b)) in enumerate((h, pair) for h in matrix.HYPOTHESES for pair in h.comparisons):
        rec_a, arr_a = data(a)
        if hypothesis.task:
            x, y = arr_a["task_kld_arithmetic"], arr_a["task_kld_text"]
            ci = intervals.two_sample_ci(x, y, seed=[seed, k], resamples=resamples)
            c = {"a": f"{a}: arithmetic", "b": f"{a}: text", "mean_a": float(x.mean()), "mean_b": float(y.mean()),
                 "unit": f"per-prompt mean KLD ({len(x)} vs {len(y)} prompts)"}
        else:
            rec_b, arr_b = data(b)
            ci = intervals.paired_ci(arr_a["kld"], arr_b["kld"], seed=[seed, k], resamples=resamples)
            c = {"a": a, "b": b, "unit": f"per-token KLD ({len(arr_a['kld'])} tokens, paired)",
                 "mean_a": rec_a["tokens"]["kld_mean"], "mean_b": rec_b["tokens"]["kld_mean"]}
        rows.append((hypothesis, dict(c, difference=ci.estimate, ci95=(ci.lo, ci.hi), block=ci.block, p=ci.p)))
    adjusted = intervals.holm([c["p"] for _, c in rows])
    out = []
    for hypothesis in matrix.HYPOTHESES:
        comparisons = tuple(Comparison(**c, p_holm=p_holm, verdict=intervals.decide(c["difference"], p_holm).value)
                            for (h, c), p_holm in zip(rows, adjusted) if h is hypothesis)
        out.append(Verdict(hypothesis.id, model, hypothesis.statement, comparisons,
                           intervals.combine([c.verdict for c in comparisons]).value))
    return out


def figures(verdict: Verdict) -> str:
    """One line with the measured figures, for test messages, recorded verdicts and the report."""
    return "; ".join(f"{c.a} {c.mean_a:.4g} vs {c.b} {c.mean_b:.4g}: difference {c.difference:.3g} "
                     f"[{c.ci95[0]:.3g}, {c.ci95[1]:.3g}] Holm p {c.p_holm:.2g} {c.verdict}"
                     for c in verdict.comparisons)


# recorded verdicts ---------------------------------------------------------------------------

def recorded_path(label: str) -> Path:
    return RECORDED_DIR / f"{label}.json"


def recorded_verdicts(label: str) -> dict[str, dict]:
    """hypothesis id -> {"verdict", "figures", "build"} as recorded for this model ({} if none)."""
    path = recorded_path(label)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return dict(data["verdicts"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"recorded verdicts {path} are malformed ({exc}): re-record with {record_command()}") from None


def record_verdict(label: str, verdict: Verdict, build_key: str) -> None:
    """Write one measured verdict into the model's record (read-modify-write under a lock, so
    parallel workers recording different hypotheses lose nothing)."""
    path = recorded_path(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root() / f"recorded-verdicts-{label}.lock")):
        verdicts = recorded_verdicts(label)
        verdicts[verdict.hypothesis] = {"verdict": verdict.verdict, "figures": figures(verdict),
                                           "build": build_key}
        data = {"model": label, "family_level": intervals.FAMILY_LEVEL,
                "verdicts": dict(sorted(verdicts.items()))}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(path)


# across models -------------------------------------------------------------------------------

QUANTIZED = ("Q", "IQ", "TQ")  # weight-type prefixes whose CPU matmul quantizes activations to 8 bits


def weight_format(weight_type: str) -> str:
    """The format a cross-model comparison sees: every quantized type (Q4_1, Q4_K_M, ...) is one,
    "quantized", since their matmuls all quantize activations to 8 bits; F32, F16 ... stay themselves."""
    return "quantized" if weight_type.startswith(QUANTIZED) else weight_type


def across_models(models: Mapping[str, Mapping[str, str]],
                  recorded: Mapping[str, Mapping[str, str]]) -> list[AcrossModels]:
    """Per hypothesis, whether its recorded verdict is the same on every model, or changes with the
    weight format (two models of one architecture, different formats) or with the architecture (two
    architectures, one format). `models`: name -> its GGUF metadata ("arch", "weight_type"), never its
    name; `recorded`: name -> hypothesis id -> recorded verdict. A model without a record for a
    hypothesis is left out of it and listed as unrecorded."""
    out = []
    for h in matrix.HYPOTHESES:
        have = {m: recorded[m][h.id] for m in models if h.id in recorded.get(m, {})}
        fmt = {m: weight_format(models[m]["weight_type"]) for m in have}
        differs: dict[str, list[list[str]]] = {"weight format": [], "architecture": []}
        compared = dict.fromkeys(differs, 0)
        for a, b in combinations(have, 2):
            same_arch = models[a]["arch"] == models[b]["arch"]
            if same_arch == (fmt[a] == fmt[b]):
                continue  # nothing differs, or both do: such a pair cannot say which one matters
            what = "weight format" if same_arch else "architecture"
            compared[what] += 1
            if have[a] != have[b]:
                differs[what].append([a, b])
        if len(have) < 2:
            finding = "too few"
        elif len(set(have.values())) == 1:
            finding = "same"
        else:
            finding = " and ".join(what for what, pairs in differs.items() if pairs) or "confounded"
        out.append(AcrossModels(h.id, h.statement, finding, have, fmt, differs, compared,
                                [m for m in models if m not in have]))
    return out


# intervals of single groups -------------------------------------------------------------------

def with_intervals(record: dict, arrays: dict[str, np.ndarray], seed: int = intervals.SEED) -> dict:
    """The group's record with its 95 % CIs and the block lengths used: the METRICS over tokens
    (circular blocks), and for the H5 prompts per-prompt means (independent)."""
    rec = GroupRecord.from_json(record)
    cis = {m: intervals.mean_ci(m.per_token(arrays), seed=[seed, i]) for i, m in enumerate(METRICS)}
    tokens = replace(rec.tokens, **{m.interval: Estimate(*ci.triple()) for m, ci in cis.items()},
                     blocks=Blocks(**{m.block: ci.block for m, ci in cis.items()}))
    tasks = rec.tasks
    if tasks is not None:
        kinds = {}
        for i, kind in enumerate(("arithmetic", "text")):
            per_prompt = arrays[f"task_kld_{kind}"]
            kinds[kind] = replace(getattr(tasks, kind), n_prompts=len(per_prompt), kld_ci=Estimate(
                *intervals.mean_ci(per_prompt, block=1, seed=[seed, 3 + i]).triple()))
        delta = intervals.mean_ci(arrays["answer_logprob_delta"], block=1, seed=[seed, 5])
        tasks = Tasks(**kinds, answer_logprob=replace(tasks.answer_logprob, delta_ci=Estimate(*delta.triple())))
    return replace(rec, tokens=tokens, tasks=tasks).to_json()


def sweep_top(data: GroupData, n_layer: int, seed: int = intervals.SEED) -> SweepTop:
    """The most sensitive layer of the per-layer sweep against the runner-up: the paired
    interval of their per-token KLD difference (same tokens) and whether it excludes 0."""
    means = {il: data(matrix.layer_id(il))[0]["tokens"]["kld_mean"] for il in range(n_layer)}
    top, runner_up = sorted(means, key=lambda il: -means[il])[:2]
    ci = intervals.paired_ci(data(matrix.layer_id(top))[1]["kld"], data(matrix.layer_id(runner_up))[1]["kld"],
                             seed=[seed, 6])
    return SweepTop(top, runner_up, means[top], means[runner_up], Estimate(*ci.triple()), ci.block, ci.p, ci.lo > 0)


def dose_response(data: GroupData, seed: int = intervals.SEED) -> list[DosePoint]:
    """Mean KLD (95 % CI) against the scale of ffn_norm bf16 fake quantization on the sweep
    slice: 0 is the baseline, 1 the `all` group restricted to the same tokens."""
    points = [DosePoint(0.0, Estimate(0.0, 0.0, 0.0))]
    n = None
    for k, scale in enumerate(matrix.SCALES):
        record, arrays = data(matrix.scale_id(scale))
        n = len(arrays["kld"])
        ci = intervals.mean_ci(arrays["kld"], seed=[seed, 7 + k])
        points.append(DosePoint(record["scale"], Estimate(*ci.triple())))
    full = data("all")[1]["kld"][:n]
    points.append(DosePoint(1.0, Estimate(*intervals.mean_ci(full, seed=[seed, 7 + len(matrix.SCALES)]).triple())))
    return points


# the results file ------------------------------------------------------------------------------

def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV, DEFAULT_RESULTS))


def write_results(sessions: dict[str, object], build_fingerprint: dict, corpus: dict,
                  group_ids: list[str] | None = None, path: Path | None = None) -> Path:
    """Assemble every group of every model (from the runner's cache; `group_ids` limits it to
    those, e.g. one `-k first5` run) with the intervals, verdicts (and the recorded ones),
    sweep comparison and dose response their groups allow, into the results file the report reads."""
    groups, verdicts, models, dose, sweeps, recorded = [], [], {}, {}, {}, {}
    for name, session in sessions.items():
        label = matrix.model_label(name)
        recorded[name] = {h: r["verdict"] for h, r in recorded_verdicts(label).items()}
        models[name] = {"label": label, "path": str(session.file.path), "sha256": session.file.sha256,
                        "arch": session.info.arch, "weight_type": session.info.weight_type,
                        "n_layer": session.model.n_layer, "n_embd": session.model.n_embd,
                        "n_vocab": session.model.n_vocab}
        chosen = [g for g in session.groups if group_ids is None or g in group_ids]
        groups += [with_intervals(*session.run(group_id)) for group_id in chosen]
        if all(g in chosen for h in matrix.HYPOTHESES for pair in h.comparisons for g in pair):
            verdicts += [replace(v, recorded=recorded[name].get(v.hypothesis)).to_json()
                         for v in family(name, session.run)]
        if all(g in chosen for g in ("all", *map(matrix.scale_id, matrix.SCALES))):
            dose[name] = [p.to_json() for p in dose_response(session.run)]
        layers = [matrix.layer_id(il) for il in range(session.model.n_layer)]
        if len(layers) >= 2 and all(g in chosen for g in layers):
            sweeps[name] = sweep_top(session.run, session.model.n_layer).to_json()
    compute = sum(g["timing"]["compute_s"] for g in groups)
    wall = sum(g["timing"]["wall_s"] for g in groups)
    results = {
        "provenance": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version(), "build": build_fingerprint, "corpus": corpus,
            "backend": next(iter(sessions.values())).backend if sessions else None,
            "matrix": {"n_ctx": matrix.N_CTX, "scored_from": matrix.SCORED_FROM, "main_chunks": matrix.MAIN_CHUNKS,
                       "sweep_chunks": matrix.SWEEP_CHUNKS, "generation_tokens": matrix.GENERATION_TOKENS,
                       "seed": matrix.SEED},
            "statistics": {"method": "circular block bootstrap, Politis-White block length (arch)",
                           "resamples": intervals.RESAMPLES, "confidence": intervals.CONFIDENCE,
                           "family_level": intervals.FAMILY_LEVEL, "correction": "Holm", "seed": intervals.SEED,
                           "record_command": record_command()},
            "group_wall_seconds": round(wall, 1), "group_compute_seconds": round(compute, 1),
        },
        "models": models, "groups": groups, "verdicts": verdicts, "across_models": [a.to_json() for a in across_models(models, recorded)],
        "dose_response": dose, "sweep_top": sweeps,
    }
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return path
