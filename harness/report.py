"""The results file → a Markdown report (`index.md`) with PNG plots, a copy of the results beside it.

Every figure in the report is read from the results file written by `harness.verdicts`; nothing
is typed in by hand, and models and groups are whatever the file holds (groups are told apart by
their `kind` and their fake-quantization `rules`). A plot whose data are absent is skipped with a
line in the report saying why.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.cache import HarnessError
from harness.driver import FakeQuantRule
from harness.driver import EVERY_LAYER
from harness.metrics import METRICS, Metric
from harness.records import (AcrossModels, Comparison, DosePoint, Estimate, GroupRecord, RecordError, SweepTop,
                             TokenSummary, Verdict)
from harness.verdicts import weight_format

REQUIRED_KEYS = ("provenance", "models", "groups")
REQUIRED_GROUP_KEYS = ("group", "model", "kind", "tokens")
TABLE_KINDS = ("design", "control")  # the groups of the experiment matrix proper
VERDICT_MEANING = {
    "holds": "every difference is above 0, significant after Holm's correction",
    "refuted": "a difference is below 0, significant after Holm's correction",
    "inconclusive": "no difference is significant after Holm's correction",
}
FULL_PRECISION = ("F32",)  # weight types whose matmul takes the activations as they are
VERDICT_VERB = {"holds": "holds", "refuted": "is refuted", "inconclusive": "is inconclusive"}
DESIGN_COLOUR, CONTROL_COLOUR = "tab:blue", "tab:red"
# the plots' files beside index.md (PLOTS draws them, the sections link them)
LAYERS_PNG, ACCUMULATION_PNG, HIST_PNG, GROUPS_PNG, DOSE_PNG = (
    "layer_sensitivity.png", "error_accumulation.png", "ffn_norm_hist.png", "groups.png", "dose_response.png")


def log(message: str) -> None:
    print(f"[report] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# number and text formatting


def num(x: Any, spec: str = ".3g") -> str:
    """A measured value as text; "–" where the file has none."""
    if x is None:
        return "–"
    return format(float(x), spec)


def pct(x: Any, spec: str = ".3g") -> str:
    return "–" if x is None else f"{float(x) * 100:{spec}} %"


def with_ci(ci: Estimate, estimate: Any = None, spec: str = ".3g") -> str:
    """"estimate [lo, hi]" of an interval; `estimate` in place of the interval's own (a summary's mean)."""
    return f"{num(ci.estimate if estimate is None else estimate, spec)} [{num(ci.lo, spec)}, {num(ci.hi, spec)}]"


def shown_interval(metric: Metric, t: TokenSummary) -> Estimate:
    """A metric's interval on the scale the report shows it (exp of an interval of the log)."""
    ci = getattr(t, metric.interval)
    return Estimate(*map(math.exp, ci.to_json())) if metric.log_interval else ci


def metric_text(metric: Metric, t: TokenSummary) -> str:
    """"estimate [lo, hi]" of a metric of harness.metrics.METRICS, in its display format."""
    ci = getattr(t, metric.interval)
    scale = math.exp if metric.log_interval else (lambda v: v)
    show = (lambda v: pct(v, metric.spec)) if metric.percent else (lambda v: num(v, metric.spec))
    return f"{show(getattr(t, metric.estimate))} [{show(scale(ci.lo))}, {show(scale(ci.hi))}]"


def ratio(x: float) -> str:
    """Perplexity ratios sit close to 1: four decimals show the change."""
    return f"{x:.4f}"


def duration(seconds: float) -> str:
    s = float(seconds)
    h, rest = divmod(int(round(s)), 3600)
    m, sec = divmod(rest, 60)
    human = f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"
    return f"{s:.0f} s ({human})"


def cell(text: str) -> str:
    """Free text made safe for one Markdown table cell: Markdown syntax escaped, line breaks
    shown as ↵ (a table cell holds one line)."""
    if text == "":
        return "(empty)"
    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch in "\\`*_[]<>|~#&":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append(" ↵ ")
        else:
            out.append(ch)
    return "".join(out)


def table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# reading the results


def load(results_path: Path) -> dict:
    """The results file, checked for the keys every section needs."""
    if not results_path.is_file():
        raise HarnessError(f"results file {results_path} not found: run the experiment matrix first "
                           f"(tox -e experiments), or name an existing results file")
    try:
        data = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"results file {results_path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HarnessError(f"results file {results_path} is malformed: expected a JSON object at the top level")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise HarnessError(f"results file {results_path} is malformed: missing key '{key}'")
    if not isinstance(data["groups"], list) or not data["groups"]:
        raise HarnessError(f"results file {results_path} is malformed: 'groups' must be a non-empty list")
    for i, group in enumerate(data["groups"]):
        for key in REQUIRED_GROUP_KEYS:
            if not isinstance(group, dict) or key not in group:
                raise HarnessError(f"results file {results_path} is malformed: groups[{i}] has no key '{key}'")
    return data


def group_record(data: dict, where: str) -> GroupRecord:
    """A group of results.json as its typed record, with the intervals of every metric (which
    harness.verdicts.with_intervals adds and the report shows)."""
    g = GroupRecord.from_json(data, where)
    for metric in METRICS:
        if getattr(g.tokens, metric.interval) is None:
            raise RecordError(f"{where}.tokens has no interval '{metric.interval}'")
    return g


class Results:
    """Look-ups over one results file, its groups, verdicts, dose response and sweep tops read as
    typed records (harness.records)."""

    def __init__(self, data: dict):
        self.data = data
        self.prov = data["provenance"]
        self.models: dict[str, dict] = dict(data["models"])
        self.groups = [group_record(g, f"groups[{i}]") for i, g in enumerate(data["groups"])]
        self.verdicts = [Verdict.from_json(v, f"verdicts[{i}]") for i, v in enumerate(data.get("verdicts") or [])]
        self.dose = {m: [DosePoint.from_json(p, f"dose_response.{m}") for p in pts]
                     for m, pts in (data.get("dose_response") or {}).items()}
        self.sweep_top = {m: SweepTop.from_json(t, f"sweep_top.{m}") for m, t in (data.get("sweep_top") or {}).items()}
        self.across = [AcrossModels.from_json(a, f"across_models[{i}]") for i, a in enumerate(data.get("across_models") or [])]
        names = list(self.models)
        names += [g.model for g in self.groups if g.model not in names]
        self.model_names = list(dict.fromkeys(names))

    def of_model(self, model: str, kinds: tuple[str, ...] | None = None) -> list[GroupRecord]:
        return [g for g in self.groups if g.model == model and (kinds is None or g.kind in kinds)]

    def group(self, model: str, gid: str) -> GroupRecord | None:
        return next((g for g in self.groups if g.model == model and g.group == gid), None)

    def baseline(self, model: str) -> GroupRecord | None:
        """The group with no fake-quantization rules (the reference every other group is compared with)."""
        return next((g for g in self.of_model(model, TABLE_KINDS) if is_baseline(g)), None)

    def weight_type(self, model: str) -> str:
        """The weight type recorded from the GGUF's general.file_type ("unknown" if absent)."""
        return str(self.models.get(model, {}).get("weight_type", "unknown"))

    def is_quantized(self, model: str) -> bool:
        """Quantized weights (Q4_1, Q8_0, K-quants...): the CPU matmul quantizes activations to 8 bits first."""
        return weight_format(self.weight_type(model)) == "quantized"

    def is_f32(self, model: str) -> bool:
        return self.weight_type(model) in FULL_PRECISION


def is_baseline(group: GroupRecord) -> bool:
    return not group.rules


def rule_columns(rules: Sequence[FakeQuantRule]) -> dict[str, str]:
    """The design table's description of a group, read from its rules."""
    def layers(rule: FakeQuantRule) -> str:
        return "all" if rule.layers == EVERY_LAYER else rule.layers

    def scaled(rule: FakeQuantRule) -> str:
        return "yes" if rule.scale == 1.0 else f"yes (scale {rule.scale:g})"

    ffn = [r for r in rules if r.target == "ffn_norm"]
    logits = [r for r in rules if r.target == "result_output"]
    other = [r for r in rules if r.target not in ("ffn_norm", "result_output")]
    types = list(dict.fromkeys(r.fmt for r in rules))
    type_text = ", ".join(types) if types else "–"
    if other:
        type_text += "; also " + ", ".join(f"{r.target} {r.fmt} layers {layers(r)}" for r in other)
    return {
        "ffn_norm fq": ", ".join(scaled(r) for r in ffn) if ffn else "no",
        "logits fq": ", ".join(scaled(r) for r in logits) if logits else "no",
        "layers": ", ".join(layers(r) for r in ffn) if ffn else "–",
        "type": type_text,
    }


def greedy_match(group: GroupRecord) -> float | None:
    rates = [e.match_rate for e in group.generation or () if e.sampling == "greedy" and e.match_rate is not None]
    return sum(rates) / len(rates) if rates else None


# ---------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _yerr(cis: Sequence[Estimate]) -> list[list[float]]:
    return [[max(0.0, c.estimate - c.lo) for c in cis], [max(0.0, c.hi - c.estimate) for c in cis]]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing clipped: colour-bar labels, outside legends
    _pyplot().close(fig)


def plot_layer_sensitivity(res: Results, path: Path) -> str | None:
    sweeps = {m: sorted((g for g in res.of_model(m, ("sweep",)) if g.layer is not None), key=lambda g: g.layer)
              for m in res.model_names}
    sweeps = {m: s for m, s in sweeps.items() if s}
    if not sweeps:
        return "the results hold no groups of kind `sweep`"
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 4.8))
    positive = True
    for i, (model, groups) in enumerate(sweeps.items()):
        offset = (i - (len(sweeps) - 1) / 2) * 0.15
        cis = [g.tokens.kld_ci for g in groups]
        positive &= all(c.estimate > 0 for c in cis)
        ax.errorbar([g.layer + offset for g in groups], [c.estimate for c in cis], yerr=_yerr(cis),
                    fmt="o-", ms=3.5, capsize=2.5, lw=1, label=model)
    if positive:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer whose ffn_norm output alone is fake-quantized")
    ax.set_ylabel("mean KLD vs baseline (95 % CI)")
    ax.set_title("Per-layer sensitivity: one layer's ffn_norm rounded at a time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


def accumulation_groups(res: Results, model: str) -> list[GroupRecord]:
    """Groups that fake-quantize ffn_norm and nothing else, and carry per-layer numerics."""
    return [g for g in res.of_model(model, TABLE_KINDS)
            if g.rules and all(r.target == "ffn_norm" for r in g.rules) and (g.numerics or {}).get("l_out_rel_err")]


def plot_error_accumulation(res: Results, path: Path) -> str | None:
    per_model = {m: accumulation_groups(res, m) for m in res.model_names}
    per_model = {m: gs for m, gs in per_model.items() if gs}
    if not per_model:
        return "no group that fake-quantizes only ffn_norm has per-layer numerics (`l_out_rel_err`)"
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(per_model), figsize=(5.5 * len(per_model), 4.5), squeeze=False, sharey=True)
    for ax, (model, groups) in zip(axes[0], per_model.items()):
        for g in groups:
            n = g.numerics
            y = [v if v > 0 else math.nan for v in n["l_out_rel_err"]]
            cols = rule_columns(g.rules)
            ax.plot(n["layers"], y, marker="o", ms=3, label=f"{g.group} ({cols['type']}, layers {cols['layers']})")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer N")
        ax.set_ylabel("relative error of l_out-N  ‖x − x₀‖ / ‖x₀‖")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Error accumulation through the residual stream (non-positive values not drawn)")
    _save(fig, path)
    return None


def hist_source(res: Results, model: str) -> GroupRecord | None:
    """Group `all` where it has histograms, else the first design/control group that does."""
    def has_hist(g: GroupRecord | None) -> bool:
        return g is not None and any("hist_edges" in e for e in ((g.numerics or {}).get("ffn_norm") or {}).values())

    preferred = res.group(model, "all")
    if has_hist(preferred):
        return preferred
    return next((g for g in res.of_model(model, TABLE_KINDS) if has_hist(g)), None)


def plot_ffn_norm_hist(res: Results, path: Path) -> str | None:
    rows = []
    for model in res.model_names:
        g = hist_source(res, model)
        if g is None:
            continue
        entries = g.numerics["ffn_norm"]
        layers = sorted((k for k, e in entries.items() if "hist_edges" in e), key=int)
        rows.append((model, g, [(k, entries[k]) for k in layers]))
    if not rows:
        return "no group has `ffn_norm` histograms (`hist_edges`) in its numerics"
    plt = _pyplot()
    ncols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(4.2 * ncols, 3.4 * len(rows)), squeeze=False)
    for row, (model, g, layers) in zip(axes, rows):
        fmt = rule_columns(g.rules)["type"]
        for ax, (layer, e) in zip(row, layers):
            ax.stairs(e["hist_raw"], e["hist_edges"], label="raw (FP32)", lw=1.4)
            ax.stairs(e["hist_rounded"], e["hist_edges"], label=f"rounded ({fmt})", lw=1.0, ls="--")
            ax.set_title(f"{model} · {g.group} · layer {layer}\n{pct(e['changed_fraction'])} of values changed",
                         fontsize=9)
            ax.set_xlabel("ffn_norm output value")
            ax.set_ylabel("count")
            ax.legend(fontsize=7)
        for ax in row[len(layers):]:
            ax.axis("off")
    fig.suptitle("ffn_norm activations before and after fake quantization")
    _save(fig, path)
    return None


def plot_groups(res: Results, path: Path) -> str | None:
    per_model = {m: res.of_model(m, TABLE_KINDS) for m in res.model_names}
    per_model = {m: gs for m, gs in per_model.items() if gs}
    if not per_model:
        return "the results hold no groups of kind `design` or `control`"
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(per_model), 3, figsize=(15, 4.2 * len(per_model)), squeeze=False)
    for row, (model, groups) in zip(axes, per_model.items()):
        for ax, metric in zip(row, METRICS):
            # KLD on a log scale: the baseline (KLD 0) and any non-positive estimate left out
            log_y = metric is METRICS[0]
            shown = [g for g in groups if not log_y or (not is_baseline(g) and g.tokens.kld_ci.estimate > 0)]
            label = metric.title
            for x, g in enumerate(shown):
                c = shown_interval(metric, g.tokens)
                ax.errorbar([x], [c.estimate], yerr=_yerr([c]), fmt="o", capsize=3,
                            color=CONTROL_COLOUR if g.kind == "control" else DESIGN_COLOUR)
            ax.set_xticks(range(len(shown)), [g.group for g in shown], rotation=35, ha="right")
            if log_y:
                ax.set_yscale("log")
            ax.set_ylabel(label + " (95 % CI)")
            ax.set_title(f"{model}: {label}", fontsize=10)
            ax.grid(True, axis="y", which="both", alpha=0.3)
        row[0].legend(handles=[Line2D([], [], color=DESIGN_COLOUR, marker="o", ls="", label="design"),
                               Line2D([], [], color=CONTROL_COLOUR, marker="o", ls="", label="control")], fontsize=8)
    fig.suptitle("Groups of the experiment matrix (baseline left out of the log-scale KLD panel)")
    _save(fig, path)
    return None


def plot_dose_response(res: Results, path: Path) -> str | None:
    series = {m: sorted(pts, key=lambda p: p.scale) for m, pts in res.dose.items() if pts}
    if not series:
        return "the results hold no `dose_response` data"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, pts in series.items():
        cis = [p.kld_ci for p in pts]
        ax.errorbar([p.scale for p in pts], [c.estimate for c in cis], yerr=_yerr(cis), fmt="o-", capsize=3,
                    label=model)
    ax.set_xlabel("scale s of the rounding step: y = x + s·(round(x) − x)")
    ax.set_ylabel("mean KLD vs baseline (95 % CI)")
    ax.set_title("Dose response: ffn_norm fake quantization, all layers, scaled")
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)
    return None


# ---------------------------------------------------------------------------------------------
# sections


def backend_text(backend: dict | None) -> str:
    """The backend and devices a measurement ran on (results written before they were recorded: the CPU)."""
    if not backend:
        return "cpu (not recorded: results written before the backend was)"
    devs = ", ".join(f"{d['name']} ({d['description']}, {d['type']}, {d['memory_total_mib'] / 1024:.1f} GiB)"
                     for d in backend["devices"])
    offloaded = f", {backend['gpu_layers']} layers offloaded" if backend["name"] != "cpu" else ""
    return f"{backend['name']}{offloaded}; devices {devs}"


def section_provenance(res: Results) -> list[str]:
    p, b, c, m = res.prov, res.prov["build"], res.prov["corpus"], res.prov["matrix"]
    per_chunk = m["n_ctx"] - 1 - m["scored_from"]
    n_by_kind: dict[str, set[int]] = {}
    for g in res.groups:
        n_by_kind.setdefault(g.kind, set()).add(g.tokens.n_tokens)
    measured = "; ".join(f"{kind}: {', '.join(str(n) for n in sorted(ns))}" for kind, ns in n_by_kind.items())
    wall, compute = p["group_wall_seconds"], p["group_compute_seconds"]
    share = pct(compute / wall) if wall else "–"
    lines = [
        "# ffn_norm fake quantization: report",
        "",
        "## Provenance",
        "",
        f"- Date: {p['date']}",
        f"- Machine: {p['cores']} cores, {p['cpu']}; Python {p['python']}",
        f"- Build: llama.cpp commit `{b['llama_cpp_commit']}` with the fake-quant patch "
        f"(sha256 `{b['patch_sha256'][:12]}`), llama-cpp-python {b.get('llama_cpp_python', '–')}; "
        f"compiler {b['compiler']}; flags `{b['flags']}`; build key `{b['key']}`",
        f"- Backend: {backend_text(p.get('backend'))}",
        f"- Corpus: {c['name']} (sha256 `{c['sha256'][:12]}`, {c.get('n_chars', '–')} characters); "
        f"chunks of {m['n_ctx']} tokens, positions {m['scored_from']}..{m['n_ctx'] - 2} of each scored, so "
        f"{m['main_chunks']} × {per_chunk} = {m['main_chunks'] * per_chunk} tokens per design/control group and "
        f"{m['sweep_chunks']} × {per_chunk} = {m['sweep_chunks'] * per_chunk} per sweep/scale group "
        f"(n_tokens in the results by kind: {measured}); {statistics_text(p)}; "
        f"{m['generation_tokens']} generated tokens per prompt; seed {m['seed']}",
        f"- Measurement: the groups took {duration(wall)} of wall time (summed over groups; parallel "
        f"workers overlap), {share} of it inside llama.cpp compute ({duration(compute)})",
        "",
    ]
    lines += table(["model", "path", "sha256", "n_layer", "n_embd", "n_vocab", "architecture", "weight type"],
                   [[name, f"`{info.get('path', '–')}`", f"`{str(info.get('sha256', '–'))[:12]}`",
                     str(info.get("n_layer", "–")), str(info.get("n_embd", "–")), str(info.get("n_vocab", "–")),
                     str(info.get("arch", "–")), res.weight_type(name)]
                    for name, info in res.models.items()])
    return lines


def statistics_text(prov: dict) -> str:
    st = prov["statistics"]
    return (f"intervals: {st['method']}, {st['resamples']} resamples, {pct(st['confidence'], 'g')} level, seed "
            f"{st['seed']}; verdicts: {st['correction']} correction over each model's comparisons at family-wise "
            f"level {st['family_level']:g}")


def block_range(res: Results) -> str:
    blocks = sorted({b for g in res.groups if g.tokens.blocks for b in asdict(g.tokens.blocks).values()}
                    | {c.block for v in res.verdicts for c in v.comparisons if c.unit.startswith("per-token")})
    return f"{blocks[0]}–{blocks[-1]} tokens" if blocks else "–"


def section_how_to_read(res: Results) -> list[str]:
    st = res.prov["statistics"]
    text = (
        "**KLD** is the mean Kullback-Leibler divergence of the model's next-token distribution from the "
        "baseline's (same model, no fake quantization) over the scored corpus tokens; larger means the rounding "
        "moved the predictions further. **Top-1 agreement** is the fraction of those tokens where the most likely "
        "next token is the same as the baseline's, and the **PPL ratio** is the perplexity of the corpus under the "
        "fake-quantized model divided by the baseline's (1 means no change). "
        f"Every CI over tokens is a **circular block bootstrap** ({st['resamples']} resamples; neighbouring tokens "
        "of one text are correlated, so blocks of consecutive tokens are drawn, wrapping around the end so every "
        "token is equally likely) with the **block length chosen from the data** by Politis and White's rule "
        f"(here {block_range(res)}); per-prompt values are resampled independently. Comparisons of two groups are "
        "paired (the same tokens). Each model's hypothesis comparisons form one family: their bootstrap p-values "
        f"are **Holm-adjusted**, so the family-wise error rate is {st['family_level']:g}. A hypothesis **holds** "
        "when every difference it names is significantly above 0, is **refuted** when one is significantly below "
        "0, and is **inconclusive** otherwise. The 95 % CIs shown are per comparison (not adjusted)."
    )
    quantized = [m for m in res.model_names if res.is_quantized(m)]
    f32 = [m for m in res.model_names if res.is_f32(m)]
    other = [m for m in res.model_names if m not in quantized and m not in f32]
    parts = [f"{m} has {res.weight_type(m)} weights: its matmuls quantize activations to 8 bits first, which "
             "interacts with the rounding under test" for m in quantized]
    parts += [f"{m} has F32 weights, so it measures the rounding alone" for m in f32]
    parts += [f"{m} has {res.weight_type(m)} weights: its matmuls convert activations to that type's dot-product "
              "type first" for m in other]
    if parts:
        text += " Weight types (GGUF general.file_type): " + "; ".join(parts) + "."
    return ["## How to read this report", "", text, ""]


def section_matrix(res: Results) -> list[str]:
    lines = ["## Experiment matrix", "",
             "Groups of kind design and control, per model; the first six columns are read from each group's "
             "fake-quantization rules, the rest are measured (95 % CI in brackets). Greedy match: mean over the "
             "greedy prompts of the fraction of generated tokens equal to the baseline's.", ""]
    kld, top1, ppl = METRICS
    header = ["group", "kind", "ffn_norm fq", "logits fq", "layers", "type", "fq sites", kld.header,
              "KLD p99", top1.header, ppl.header, "Δp RMS", "greedy match"]
    for model in res.model_names:
        groups = res.of_model(model, TABLE_KINDS)
        if not groups:
            continue
        rows = []
        for g in groups:
            t = g.tokens
            cols = rule_columns(g.rules)
            rows.append([f"`{g.group}`", g.kind, cols["ffn_norm fq"], cols["logits fq"], cols["layers"],
                         cols["type"], str(g.fake_quant_sites),
                         metric_text(kld, t), num(t.kld_p99), metric_text(top1, t), metric_text(ppl, t),
                         num(t.dp_rms), pct(greedy_match(g))])
        lines += [f"### {model}", ""] + table(header, rows)
    return lines


def record_command(res: Results) -> str:
    return res.prov["statistics"]["record_command"]


def comparison_text(c: Comparison) -> str:
    lo, hi = c.ci95
    return (f"{c.a} {num(c.mean_a)} vs {c.b} {num(c.mean_b)}, difference {num(c.difference)} "
            f"[{num(lo)}, {num(hi)}], Holm p {num(c.p_holm, '.2g')}")


def hypothesis_sentence(res: Results, hid: str, records: list[Verdict]) -> str:
    figures = "; ".join(f"{r.model}: " + "; ".join(comparison_text(c) for c in r.comparisons) for r in records)
    statement = records[0].statement
    verdicts = {r.verdict for r in records}
    if len(verdicts) == 1:
        v = verdicts.pop()
        where = (f"on {records[0].model}" if len(records) == 1 else
                 "on both models" if len(records) == 2 else f"on all {len(records)} models")
        text = f"**{hid}** ({statement}) {VERDICT_VERB.get(v, v)} {where}: {VERDICT_MEANING.get(v, v)} ({figures})."
    else:
        parts = ", ".join(f"{r.verdict} on {r.model}" for r in records)
        text = f"**{hid}** ({statement}) differs between models: {parts} ({figures})."
    notes = []
    for r in records:
        if r.recorded is None:
            notes.append(f"{r.model} has none recorded (record it with `{record_command(res)}`)")
        elif r.recorded == r.verdict:
            notes.append(f"{r.model} as recorded ({r.recorded})")
        else:
            notes.append(f"{r.model} recorded {r.recorded}, measured {r.verdict}")
    if notes:
        text += " Recorded verdict: " + "; ".join(notes) + "."
    return text


def section_hypotheses(res: Results) -> list[str]:
    lines = ["## Hypotheses", ""]
    if not res.verdicts:
        return lines + ["The results hold no verdicts.", ""]
    level = res.prov["statistics"]["family_level"]
    lines += [f"Verdicts at family-wise level {level:g} per model (Holm's correction over the model's "
              f"{sum(len(v.comparisons) for v in res.verdicts if v.model == res.verdicts[0].model)} "
              "comparisons); *recorded* is the verdict recorded with the snapshots, which the tests check.", ""]
    by_id: dict[str, dict[str, Verdict]] = {}
    for v in res.verdicts:
        by_id.setdefault(v.hypothesis, {})[v.model] = v
    models = list(dict.fromkeys(v.model for v in res.verdicts))
    rows = [[hid, cell(next(iter(per_model.values())).statement)]
            + [verdict_cell(per_model[m]) if m in per_model else "–" for m in models]
            for hid, per_model in by_id.items()]
    lines += table(["id", "statement"] + [model_heading(res, m) for m in models], rows)
    rows = [[v.hypothesis, v.model,
             "; ".join(f"{cell(comparison_text(c))} ({c.verdict}, {c.unit})" for c in v.comparisons)]
            for v in res.verdicts]
    lines += table(["id", "model", "comparisons: a mean vs b mean, difference [95 % CI], Holm-adjusted p"], rows)
    unrecorded = sorted({v.model for v in res.verdicts if v.recorded is None})
    if unrecorded:
        lines += [f"No verdicts are recorded for {', '.join(unrecorded)}: review the verdicts above, then record "
                  f"them with `{record_command(res)}` (tests/snapshots/verdicts/MODEL.json; the tests then fail when "
                  "a verdict changes).", ""]
    for hid, per_model in by_id.items():
        lines += [hypothesis_sentence(res, hid, list(per_model.values())), ""]
    return lines


def model_heading(res: Results, model: str) -> str:
    """A model with what its GGUF says about it (architecture, general.file_type), not what its name says."""
    return f"{model} ({res.models.get(model, {}).get('arch', 'unknown')}, {res.weight_type(model)})"


def verdict_cell(v: Verdict) -> str:
    """The measured verdict, and how it stands against the recorded one."""
    note = ("none recorded" if v.recorded is None else "as recorded" if v.recorded == v.verdict
            else f"recorded {v.recorded}")
    return f"**{v.verdict}** ({note})"


def across_sentence(res: Results, a: AcrossModels) -> str:
    """One hypothesis's recorded verdicts across models: the same everywhere, or what they depend on."""
    verdicts, formats = a.verdicts, a.formats

    def who(m: str, what: str) -> str:
        return f"{m} ({what}) {verdicts[m]}"

    head = f"**{a.hypothesis}** ({a.statement})"
    n_format, n_arch = a.compared["weight format"], a.compared["architecture"]
    compared = f"{n_format} weight-format and {n_arch} architecture pairs"
    if a.finding == "too few":
        text = f"{head}: fewer than two models have a recorded verdict; nothing to compare."
    elif a.finding == "same":
        v = next(iter(verdicts.values()))
        where = "both models" if len(verdicts) == 2 else f"all {len(verdicts)} models"
        if n_format and n_arch:
            claim = "it depends neither on the weight format nor on the architecture."
        elif n_format or n_arch:
            tested, untested = ("weight format", "architecture") if n_format else ("architecture", "weight format")
            claim = f"it does not depend on the {tested}; no two of them differ in {untested} alone."
        else:
            claim = "no two of them differ in one respect only."
        text = (f"{head} {VERDICT_VERB.get(v, v)} on {where} with a recorded verdict ({', '.join(verdicts)}; "
                f"{compared} compared): {claim}")
    elif a.finding == "confounded":
        text = (f"{head} differs between models ({', '.join(f'{m} {v}' for m, v in verdicts.items())}), but never "
                f"between two that differ in one respect only ({compared} compared): what it depends on is open.")
    else:
        parts = []
        if a.differs["weight format"]:
            parts.append("on the weight format (" + "; ".join(
                f"{res.models[x]['arch']}: {who(x, res.weight_type(x))} vs {who(y, res.weight_type(y))}"
                for x, y in a.differs["weight format"]) + ")")
        if a.differs["architecture"]:
            parts.append("on the architecture (" + "; ".join(
                f"{formats[x]} weights: {who(x, res.models[x]['arch'])} vs {who(y, res.models[y]['arch'])}"
                for x, y in a.differs["architecture"]) + ")")
        text = f"{head} depends " + " and ".join(parts) + "."
        masked = [(q, f) for x, y in a.differs["weight format"]
                  for q, f in ((x, y), (y, x)) if formats[q] == "quantized" and res.is_f32(f)
                  and verdicts[f] == "holds" and verdicts[q] != "holds"]
        if masked:
            text += (" It holds with F32 weights but not with quantized ones ("
                     + ", ".join(f"{q} vs {f}" for q, f in masked) + "): this points to masking, the quantized "
                     "model's matmuls quantize activations to 8 bits, an error of their own that hides part of the "
                     "rounding's, while F32 weights measure the rounding alone.")
    if a.unrecorded:
        text += f" Not recorded, left out: {', '.join(a.unrecorded)} (record with `{record_command(res)}`)."
    return text


def section_across(res: Results) -> list[str]:
    lines = ["## Verdicts across models", ""]
    across = res.across
    if not across:
        return lines + ["The results hold no comparison of verdicts across models (`across_models`).", ""]
    lines += ["From the verdicts recorded with the snapshots (tests/snapshots/verdicts/MODEL.json) and each model's "
              "GGUF metadata (architecture, general.file_type). A verdict **depends on the weight format** when it "
              "differs between two models of one architecture with different weight formats, and **on the "
              "architecture** when it differs between two architectures with the same weight format; every "
              "quantized type (" + ", ".join(sorted({res.weight_type(m) for m in res.model_names
                                                     if res.is_quantized(m)})) + ") counts as one format, "
              "*quantized*: their matmuls all quantize activations to 8 bits.", ""]
    return lines + [line for a in across for line in (across_sentence(res, a), "")]


def section_tasks(res: Results) -> list[str]:
    lines = ["## Task sensitivity", ""]
    rows = []
    for model in res.model_names:
        g = res.group(model, "all")
        if g is None or g.tasks is None:
            continue
        a, x, lp = g.tasks.arithmetic, g.tasks.text, g.tasks.answer_logprob
        rows.append([model, num(a.kld_mean), with_ci(a.kld_ci), num(x.kld_mean), with_ci(x.kld_ci),
                     num(lp.base_mean), num(lp.test_mean), with_ci(lp.delta_ci)])
    if not rows:
        return lines + ["Skipped: no group `all` with task results.", ""]
    lines += ["Group `all`: KLD on arithmetic and on text prompts (token mean, and the mean over prompts of each "
              "prompt's mean KLD with its 95 % CI), and the log-probability of the arithmetic answers under the "
              "baseline and the fake-quantized model.", ""]
    return lines + table(["model", "arithmetic KLD (tokens)", "arithmetic KLD per prompt [CI]", "text KLD (tokens)",
                          "text KLD per prompt [CI]", "answer log-prob baseline", "answer log-prob test",
                          "Δ log-prob [CI]"], rows)


def figure_lines(title: str, image: str, skipped: dict[str, str | None], caption: str) -> list[str]:
    """A section with the plot `image`, or the reason it was skipped (`skipped[image]`)."""
    lines = [f"## {title}", ""]
    if skipped[image]:
        return lines + [f"Plot skipped: {skipped[image]}.", ""]
    return lines + [f"![{title}]({image})", "", caption, ""]


def section_layers(res: Results, skipped: dict[str, str | None]) -> list[str]:
    caption = ("Mean KLD (95 % CI) when the ffn_norm output of one layer alone is fake-quantized, per layer and model.")
    tops = []
    for model, t in res.sweep_top.items():
        verdict = ("distinguishable from the runner-up" if t.distinguishable else
                   "**not** distinguishable from the runner-up (the paired 95 % CI of the difference includes 0)")
        tops.append(f"{model}: layer {t.top} ({num(t.kld_top)}) vs layer {t.runner_up} ({num(t.kld_runner_up)}), "
                    f"paired difference {with_ci(t.difference_ci)}: {verdict}")
    if tops:
        caption += " Highest mean KLD against the runner-up — " + "; ".join(tops) + "."
    lines = figure_lines("Layer sensitivity", LAYERS_PNG, skipped, caption)
    if skipped[LAYERS_PNG]:
        return lines
    sweeps = {m: {g.layer: g.tokens for g in res.of_model(m, ("sweep",)) if g.layer is not None}
              for m in res.model_names}
    sweeps = {m: s for m, s in sweeps.items() if s}
    layers = sorted({layer for s in sweeps.values() for layer in s})
    rows = [[str(layer)] + [with_ci(s[layer].kld_ci, s[layer].kld_mean) if layer in s else "–"
                            for s in sweeps.values()] for layer in layers]
    return lines + table(["layer"] + [f"{m} KLD [95 % CI]" for m in sweeps], rows)


def section_generation(res: Results) -> list[str]:
    lines = ["## Generation", "",
             "Greedy continuations and the seeded-sampling scenario, per group, next to the baseline's. Token "
             "positions count the generated tokens from 0; ↵ marks a line break.", ""]
    any_rows = False
    for model in res.model_names:
        base = res.baseline(model)
        base_entries = {(e.id, e.sampling): e for e in (base.generation if base else None) or ()}
        groups = [g for g in res.of_model(model, TABLE_KINDS) if not is_baseline(g) and g.generation]
        if not groups:
            continue
        any_rows = True
        lines += [f"### {model}", ""]
        prompts = {(e.id, e.sampling): e for g in [base] + groups if g for e in g.generation or ()}
        lines += table(["prompt", "kind", "sampling", "prompt text"],
                       [[f"`{pid}`", e.kind, sampling, cell(e.prompt)] for (pid, sampling), e in prompts.items()])
        for g in groups:
            rows = []
            for e in g.generation:
                b = base_entries.get((e.id, e.sampling))
                first = e.first_divergence
                if b is not None and first is None and e.tokens == b.tokens:
                    where, text = "identical to baseline", "(identical to baseline)"
                else:
                    where = f"first divergence at token {first}" if first is not None else "–"
                    text = cell(e.text)
                rows.append([f"`{e.id}`", e.sampling, cell(b.text) if b else "(no baseline)", text, where,
                             pct(e.match_rate)])
            lines += [f"#### `{g.group}`: {cell(g.description)}", ""]
            lines += table(["prompt", "sampling", f"baseline (`{base.group if base else '–'}`)",
                            f"`{g.group}`", "divergence", "match"], rows)
    if not any_rows:
        lines += ["No group besides the baseline has generation results.", ""]
    return lines


def section_dose(res: Results, skipped: dict[str, str | None]) -> list[str]:
    lines = figure_lines("Dose response", DOSE_PNG, skipped,
                         "Mean KLD (95 % CI) as the ffn_norm rounding step is scaled from 0 (baseline) to 1 (full "
                         "fake quantization of every layer), on the sweep's tokens.")
    if skipped[DOSE_PNG]:
        return lines
    series = {m: {p.scale: p for p in pts} for m, pts in res.dose.items() if pts}
    scales = sorted({s for pts in series.values() for s in pts})
    rows = [[f"{s:g}"] + [with_ci(pts[s].kld_ci) if s in pts else "–" for pts in series.values()] for s in scales]
    return lines + table(["scale"] + [f"{m} KLD [95 % CI]" for m in series], rows)


# ---------------------------------------------------------------------------------------------


PLOTS: tuple[tuple[str, Callable[[Results, Path], str | None]], ...] = (
    (LAYERS_PNG, plot_layer_sensitivity),
    (ACCUMULATION_PNG, plot_error_accumulation),
    (HIST_PNG, plot_ffn_norm_hist),
    (GROUPS_PNG, plot_groups),
    (DOSE_PNG, plot_dose_response),
)


def render(results_path: Path, out_dir: Path) -> Path:
    """Write `index.md`, the PNG plots and a copy of the results (`results.json`) into `out_dir`;
    return the path of `index.md`. A missing or malformed results file raises HarnessError."""
    results_path, out_dir = Path(results_path), Path(out_dir)
    try:
        res = Results(load(results_path))
    except (RecordError, KeyError, TypeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise HarnessError(f"results file {results_path} is malformed ({what})") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / "results.json"
    if not (copy.exists() and copy.resolve() == results_path.resolve()):
        shutil.copyfile(results_path, copy)

    current = "start"
    try:
        skipped: dict[str, str | None] = {}
        for name, plot in PLOTS:
            current = name
            target = out_dir / name
            target.unlink(missing_ok=True)  # a plot skipped now must not leave an old image behind
            skipped[name] = plot(res, target)
            log(f"plot {name}" if skipped[name] is None else f"skip {name}: {skipped[name]}")
        lines: list[str] = []
        for current, make in [
            ("provenance", lambda: section_provenance(res)),
            ("how to read", lambda: section_how_to_read(res)),
            ("experiment matrix", lambda: section_matrix(res)),
            ("hypotheses", lambda: section_hypotheses(res)),
            ("verdicts across models", lambda: section_across(res)),
            ("task sensitivity", lambda: section_tasks(res)),
            ("layer sensitivity", lambda: section_layers(res, skipped)),
            ("error accumulation", lambda: figure_lines(
                "Error accumulation", ACCUMULATION_PNG, skipped,
                "Relative error of the residual stream after each layer (l_out-N) against the baseline, for the "
                "groups that fake-quantize ffn_norm only: how the rounding error grows or decays through the model.")),
            ("activation distribution", lambda: figure_lines(
                "Activation distribution", HIST_PNG, skipped,
                "Histograms of the ffn_norm output before and after the rounding at the first, middle and last layer, "
                "with the fraction of values the rounding changed.")),
            ("group comparison", lambda: figure_lines(
                "Group comparison", GROUPS_PNG, skipped,
                "Mean KLD, top-1 agreement and perplexity ratio (95 % CI) of every design group, with the logits-only "
                "control in red.")),
            ("dose response", lambda: section_dose(res, skipped)),
            ("generation", lambda: section_generation(res)),
        ]:
            log(f"section {current}")
            lines += make()
    except (KeyError, TypeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise HarnessError(f"results file {results_path} is malformed ({what}, while rendering {current})") from exc
    lines += ["---", "", f"Results: [`{copy.name}`]({copy.name}) — {copy.resolve()}", ""]
    index = out_dir / "index.md"
    index.write_text("\n".join(lines), encoding="utf-8")
    log(f"wrote {index}")
    return index
