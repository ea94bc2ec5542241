"""atlas.json → `atlas.md` with a heatmap per model and format and a ranking per model (PNG, in
`atlas/` beside it).

Kept apart from harness.atlas on purpose: the atlas's point cache is keyed by the source of
harness.atlas and everything it imports, so a change to a caption here must not throw away hours
of measurements. Every figure is read from atlas.json; a table or plot whose data are absent
says why instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from harness.atlas import layer_spec
from harness.cache import HarnessError
from harness.records import (Additivity, AdditivitySkipped, MeasuredPoint, NonFinitePoint, PointRecord,
                             RecordError, SkippedPoint, additivity_from_json, point_from_json)
from harness.report import _pyplot, _save, _yerr, backend_text, duration, num, pct, ratio, table, with_ci

TOP_PAIRS = 10
MARKERS = "os^vD<>pPX*hH8d"  # one per format, in the order the atlas lists them


def load_atlas(path: Path) -> dict:
    if not path.is_file():
        raise HarnessError(f"atlas file {path} not found: run `python -m harness atlas` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HarnessError(f"atlas file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not data.get("models"):
        raise HarnessError(f"atlas file {path} is malformed: expected an object with a non-empty 'models' list")
    return data


class View:
    """Look-ups over one model's part of atlas.json, its points read as typed records (harness.records)."""

    def __init__(self, model: dict, reference: Sequence[str]) -> None:
        self.m = model
        self.ref_position, self.ref_fmt = reference
        self.label: str = model["label"]
        self.n_layer: int = model["n_layer"]
        self.layered = [p["name"] for p in model["positions"] if p["layered"]]
        self.names = [p["name"] for p in model["positions"]]
        self.records: list[PointRecord] = [point_from_json(r, f"{self.label}'s point") for r in model["points"]]
        self.points = {(r.point.position, r.point.fmt, r.point.layer): r for r in self.records}
        self.additivity = [additivity_from_json(e, f"{self.label}'s additivity[{i}]")
                           for i, e in enumerate(model["additivity"])]

    def get(self, position: str, fmt: str, layer: int | None = None) -> MeasuredPoint | None:
        """A point measured to a KLD (None when absent, skipped or with non-finite logits)."""
        r = self.points.get((position, fmt, layer))
        return r if isinstance(r, MeasuredPoint) else None

    def skipped(self) -> list[SkippedPoint]:
        return [r for r in self.records if isinstance(r, SkippedPoint)]

    def non_finite(self, fmt: str | None = None) -> list[NonFinitePoint]:
        """Points whose logits came out non-finite (the format's range was exceeded)."""
        return [r for r in self.records if isinstance(r, NonFinitePoint) and fmt in (None, r.point.fmt)]

    def singles(self, fmt: str) -> list[MeasuredPoint]:
        return [r for r in self.records if isinstance(r, MeasuredPoint) and r.point.fmt == fmt
                and r.point.layer is not None]

    def reference(self) -> MeasuredPoint | None:
        return self.get(self.ref_position, self.ref_fmt)

    def formats(self) -> list[str]:
        return list(dict.fromkeys(r.point.fmt for r in self.records))

    def single_formats(self) -> list[str]:
        """The formats with single-layer points (measured, skipped or non-finite)."""
        return list(dict.fromkeys(r.point.fmt for r in self.records if r.point.layer is not None))

    def versus_reference(self, r: PointRecord | None) -> str:
        """A point against the reference: "clearly below" (its upper bound under the reference's lower
        bound), "below by the mean", "above", "non-finite", "skipped", "reference" or "–" (not in this atlas)."""
        ref = self.reference()
        if r is None:
            return "–"
        if isinstance(r, SkippedPoint):
            return "skipped"
        if isinstance(r, NonFinitePoint):
            return "non-finite"
        if ref is None:
            return "no reference"
        if r is ref:
            return "reference"
        if r.kld_ci.hi < ref.kld_ci.lo:
            return "clearly below"
        return "below by the mean" if r.kld_ci.estimate < ref.kld_ci.estimate else "above"


def kld(r: MeasuredPoint | None) -> float | None:
    return None if r is None else r.kld_ci.estimate


def ci_text(r: MeasuredPoint | None) -> str:
    return "–" if r is None else with_ci(r.kld_ci)


def image_name(label: str, kind: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"atlas/{kind}-{safe}.png"


# plots -----------------------------------------------------------------------------------------


def shared_limits(views: Sequence[View]) -> tuple[float, float] | None:
    """Colour limits for every heatmap: the smallest and largest positive single-layer KLD of any
    model and format, so colours compare across models and formats."""
    values = [r.kld_ci.estimate for v in views for fmt in v.single_formats() for r in v.singles(fmt)
              if r.kld_ci.estimate > 0]
    return (min(values), max(values)) if values else None


def plot_heatmap(v: View, fmt: str, limits: tuple[float, float], path: Path) -> str | None:
    rows = [p for p in v.layered if any(v.get(p, fmt, il) or (p, fmt, il) in v.points for il in range(v.n_layer))]
    if not rows:
        return f"no single-layer {fmt} points measured"
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    grid = np.full((len(rows), v.n_layer), np.nan)
    for i, p in enumerate(rows):
        for il in range(v.n_layer):
            value = kld(v.get(p, fmt, il))
            if value is not None:
                grid[i, il] = value if value > 0 else limits[0] / 10  # drawn in the "under" colour
    overflowed = [(i, r.point.layer) for i, p in enumerate(rows) for r in v.non_finite(fmt)
                  if r.point.position == p and r.point.layer is not None]
    for i, il in overflowed:
        grid[i, il] = limits[1] * 10  # drawn in the "over" colour
    cmap = plt.get_cmap("viridis").with_extremes(bad="white", under="lightgrey", over="black")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * v.n_layer + 3), max(3.0, 0.3 * len(rows) + 1.6)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=LogNorm(*limits),
                      interpolation="nearest")
    ref = kld(v.reference())
    if ref is not None:
        above = np.argwhere(np.nan_to_num(grid) > ref)
        ax.scatter(above[:, 1], above[:, 0], marker="x", s=14, c="red", lw=0.8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xticks(range(0, v.n_layer, max(1, v.n_layer // 15)))
    # the marks' key in the axis label, which the layout keeps clear of the ticks (a legend below overlapped it)
    marks = "" if ref is None else f"\nred ×: mean KLD above the reference, {v.ref_position} {v.ref_fmt} ({ref:.2g})"
    ax.set_xlabel(f"layer (fake-quantized alone){marks}", fontsize=9)
    fig.colorbar(image, ax=ax, extend="both" if overflowed else "min", label="mean KLD vs baseline (nats, log scale)")
    black = ", black: non-finite logits" if overflowed else ""
    ax.set_title(f"{v.label}: {fmt} at one position and layer (white: not measured, grey: KLD ≤ 0{black})",
                 fontsize=10)
    _save(fig, path)
    return None


def lead_format(views: Sequence[View]) -> str:
    """The format positions are ranked and models compared by: the one with the most all-layers points at
    the in-layer positions of these models, bf16 among equals (an atlas of other formats still ranks its
    positions, rather than by the one bf16 point it always has, the reference)."""
    counts: dict[str, int] = {}
    for v in views:
        for f in v.formats():
            counts[f] = counts.get(f, 0) + sum(1 for p in v.layered if kld(v.get(p, f)) is not None)
    return max(counts, key=lambda f: (counts[f], f == "bf16"), default="bf16")


def ranked(v: View, fmt: str | None = None) -> list[str]:
    """Positions by their all-layers KLD in `fmt` (default: the lead format), most harmful first (those
    without one last)."""
    fmt = fmt or lead_format([v])
    return sorted(v.names, key=lambda p: (kld(v.get(p, fmt)) is None, -(kld(v.get(p, fmt)) or 0.0), p))


def plot_ranking(v: View, path: Path) -> str | None:
    order = [p for p in ranked(v) if any(v.get(p, f) for f in v.formats())]
    if not order:
        return "no all-layers points measured"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * len(order) + 2), 4.8))
    dropped = []
    fmts = v.formats()
    for j, fmt in enumerate(fmts):
        pts = [(i, v.get(p, fmt)) for i, p in enumerate(order) if v.get(p, fmt)]
        dropped += [f"{order[i]} {fmt}" for i, r in pts if r.kld_ci.estimate <= 0]
        pts = [(i, r) for i, r in pts if r.kld_ci.estimate > 0]
        if pts:
            cis = [r.kld_ci for _, r in pts]
            offset = (j - (len(fmts) - 1) / 2) * min(0.2, 0.8 / len(fmts))
            ax.errorbar([i + offset for i, _ in pts], [c.estimate for c in cis], yerr=_yerr(cis), ls="",
                        marker=MARKERS[j % len(MARKERS)], ms=4, capsize=2, label=f"{fmt}, every layer")
    ref = v.reference()
    if ref is not None:
        c = ref.kld_ci
        ax.axhline(c.estimate, color="tab:red", lw=1, ls="--",
                   label=f"reference: {v.ref_position} {v.ref_fmt}, every layer: {c.estimate:.2g}")
        ax.axhspan(c.lo, c.hi, color="tab:red", alpha=0.12)
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean KLD vs baseline (95 % CI)")
    title = f"{v.label}: positions ranked by all-layers {lead_format([v])} KLD"
    dropped += [f"{r.point.position} {r.point.fmt} (non-finite)" for r in v.non_finite()
                if r.point.layer is None and r.point.position in order]
    if dropped:
        title += f"\n(not drawn, KLD ≤ 0 or non-finite: {', '.join(dropped)})"
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return None


# sections --------------------------------------------------------------------------------------


def section_intro(data: dict) -> list[str]:
    p = data["provenance"]
    rule, b = p["rule"], p["build"]
    n = p["tokens_per_chunk"]
    return [
        "# Precision atlas", "",
        f"- Date: {p['date']}; build `{b['key']}` (llama.cpp `{b['llama_cpp_commit'][:12]}`, patch "
        f"`{b['patch_sha256'][:12]}`); corpus {p['corpus']['name']} (`{p['corpus']['sha256'][:12]}`), the matrix's "
        f"chunks of {p['n_ctx']} tokens, {n} scored per chunk.",
        f"- Backend: {backend_text(p.get('backend'))}.",
        f"- Each point rounds one position (a name of the computed graph) at one layer, or at every layer at once, "
        f"and is compared with the model's FP32-compute baseline: **mean KLD** (nats) with a 95 % circular block "
        f"bootstrap interval ({rule['resamples']} resamples, Politis-White block length, seed {rule['seed']}), "
        f"**top-1 agreement** and **PPL ratio**.",
        f"- **Stopping rule**: a point measures one chunk ({n} tokens), then adds chunks until the half-width of its "
        f"interval is at most {rule['rel_half_width']:.0%} of its mean KLD, or its KLD is exactly 0, or it has "
        f"measured the maximum (`--max-chunks`, per model below). The rule looks at the data, so an early stop "
        f"means the interval was tight then; each point's chunk count is in the tables.",
        f"- **Reference**: `{rule['reference'][0]}` in {rule['reference'][1]} (the logits rounded), measured like "
        f"any point. A position *stays below it at every layer* when each single-layer bf16 point's upper bound is "
        f"below the reference's lower bound (\"clearly\"), or at least each mean is below the reference's mean "
        f"(\"by the means\").",
        "- " + ", ".join(f"{f} rounds blocks of {n}" for f, n in rule.get("row_multiples", {"q8_0": rule["q8_0_block"]}).items())
        + " values along ne0: positions whose ne0 is not a multiple are listed as skipped, with the reason.",
        "- **Additivity**: per position and format, the per-token sum of the single-layer KLDs against the "
        "all-layers KLD on the tokens every one of those points measured; the interval of the difference "
        "(sum − all) comes from bootstrapping that per-token difference (paired, so what layers share on the same "
        "tokens is kept). *Additive*: the interval covers 0; *sub-additive*: all layers at once hurt less than the "
        "sum; *super-additive*: more.",
        "- Budget advisor: `python -m harness advise --model M --format bf16 --budget KLD` picks the largest set of "
        "(position, layer) sites whose summed single-site KLD fits the budget, measures it, and prints the flags.",
        "",
    ]


def section_non_finite(v: View) -> list[str]:
    """Where a format's range is exceeded: the points whose logits came out inf or NaN, by format
    and position (worse than any KLD: they have none, and the advisor never picks them)."""
    if not v.non_finite():
        return []
    lines = ["### Non-finite logits: where the format's range is exceeded", "",
             "Rounding these tensors made the logits inf or NaN (f16 holds magnitudes up to 65,504; bf16 has "
             "float32's range), so they have no KLD: worse than any measured point.", ""]
    rows = []
    for fmt in v.formats():
        for p in v.names:
            hits = [r for r in v.non_finite(fmt) if r.point.position == p]
            layers = sorted(r.point.layer for r in hits if r.point.layer is not None)
            if hits:
                rows.append([fmt, f"`{p}`", layer_spec(layers) if layers else "–",
                             "yes" if any(r.point.layer is None for r in hits) else
                             "no" if v.get(p, fmt) else "–", f"{hits[0].non_finite.rows} of "
                             f"{hits[0].non_finite.of}"])
    return lines + table(["format", "position", "single layers with non-finite logits", "every layer at once too?",
                          "rows non-finite (first point)"], rows)


def section_below(v: View, fmt: str) -> list[str]:
    """Per position: is `fmt` at each single layer below the reference (the logits rounded)?"""
    ref = v.reference()
    lines = [f"### Where {fmt} stays below the reference ({v.ref_position} {v.ref_fmt}), one layer at a time", ""]
    if ref is None:
        return lines + [f"Skipped: the reference point ({v.ref_position} {v.ref_fmt}) was not measured.", ""]
    rows, clearly, by_means = [], [], []
    for p in v.layered:
        measured = {il: v.get(p, fmt, il) for il in range(v.n_layer) if v.get(p, fmt, il)}
        overflowed = sorted(r.point.layer for r in v.non_finite(fmt)
                            if r.point.position == p and r.point.layer is not None)
        if not measured:
            continue
        worst_layer = max(measured, key=lambda il: measured[il].kld_ci.estimate)
        complete = len(measured) + len(overflowed) == v.n_layer
        above = [il for il, r in measured.items() if r.kld_ci.estimate >= ref.kld_ci.estimate]
        if overflowed:
            verdict = f"no: non-finite logits at layers {layer_spec(overflowed)}"
        elif above:
            verdict = f"no: mean at or above it at layers {', '.join(map(str, above))}"
        elif all(r.kld_ci.hi < ref.kld_ci.lo for r in measured.values()):
            verdict = "yes, clearly"
            if complete:
                clearly.append(p)
        else:
            verdict = "yes, by the means (some intervals overlap the reference's)"
            if complete:
                by_means.append(p)
        if not complete:
            verdict += f" (only {len(measured) + len(overflowed)} of {v.n_layer} layers measured, so not listed below)"
        rows.append([f"`{p}`", str(len(measured)), str(worst_layer), ci_text(measured[worst_layer]), verdict])
    if not rows:
        return lines + [f"Skipped: no single-layer {fmt} points measured.", ""]
    lines += [f"Reference: `{v.ref_position}` {v.ref_fmt}, KLD {ci_text(ref)}.", ""]
    lines += table(["position", "layers measured", "worst layer", f"its {fmt} KLD [95 % CI]",
                    "below the reference at every layer?"], rows)
    lines += [f"{fmt} below it at every layer, clearly: {', '.join(f'`{p}`' for p in clearly) or 'none'}; by the means "
              f"only: {', '.join(f'`{p}`' for p in by_means) or 'none'}.", ""]
    return lines


def section_sensitive(v: View) -> list[str]:
    lines = [f"### The most sensitive (position, layer) pairs (top {TOP_PAIRS} per format)", ""]
    rows = []
    for fmt in v.single_formats():
        top = sorted(v.singles(fmt), key=lambda r: -r.kld_ci.estimate)[:TOP_PAIRS]
        rows += [[str(rank), fmt, f"`{r.point.position}`", str(r.point.layer), ci_text(r),
                  pct(r.tokens.top1_agreement, ".4g"), ratio(r.tokens.ppl_ratio),
                  f"{r.chunks} ({r.stop})"] for rank, r in enumerate(top, 1)]
    if not rows:
        return lines + ["Skipped: no single-layer points measured.", ""]
    return lines + table(["rank", "format", "position", "layer", "KLD [95 % CI]", "top-1 agreement", "PPL ratio",
                          "chunks (stop)"], rows)


def section_all_layers(v: View) -> list[str]:
    """Every layer at once: a position x format overview against the reference, then every point's figures."""
    lines = ["### Every layer at once", ""]
    fmts = [f for f in v.formats() if any((p, f, None) in v.points for p in v.names)]
    order = [p for p in ranked(v) if any((p, f, None) in v.points for f in fmts)]
    if not order:
        return lines + ["Skipped: no all-layers points measured.", ""]
    ref = v.reference()
    marks = {"clearly below": "✓", "below by the mean": "≈", "above": "✗", "non-finite": "**NaN**",
             "skipped": "skip", "–": "–", "no reference": "", "reference": "(ref.)"}
    lines += [f"Mean KLD of each format at every layer of each position, against the reference "
              f"(`{v.ref_position}` {v.ref_fmt}, {ci_text(ref)}): ✓ clearly below it (upper bound under its lower "
              "bound), ≈ below by the mean, ✗ at or above it, **NaN** non-finite logits, skip: the format cannot "
              "take the tensor's shape (reason below), –: not in this atlas.", ""]
    rows = []
    for fmt in fmts:
        cells = []
        for p in order:
            r = v.points.get((p, fmt, None))
            mark = marks[v.versus_reference(r)]
            cells.append(f"{num(r.kld_ci.estimate)} {mark}" if isinstance(r, MeasuredPoint) else mark)
        rows.append([fmt, *cells])
    lines += table(["format", *[f"`{p}`" for p in order]], rows)
    detail = []
    for p in order:
        ne0 = next(x["ne0"] for x in v.m["positions"] if x["name"] == p)
        for fmt in fmts:
            r = v.points.get((p, fmt, None))
            if r is None:
                continue
            if not isinstance(r, MeasuredPoint):
                what = f"skipped ({r.skipped})" if isinstance(r, SkippedPoint) else "**non-finite logits**"
                detail.append([f"`{p}`", str(ne0), fmt, what, "–", "–", "–"])
                continue
            detail.append([f"`{p}`", str(ne0), fmt, ci_text(r), f"{r.chunks} ({r.stop})",
                           pct(r.tokens.top1_agreement, ".4g"), ratio(r.tokens.ppl_ratio)])
    lines += ["<details><summary>Every all-layers point with its interval</summary>", ""]
    lines += table(["position", "ne0", "format", "KLD [95 % CI]", "chunks (stop)", "top-1", "PPL ratio"], detail)
    return lines + ["</details>", ""]


def section_additivity(v: View) -> list[str]:
    lines = ["### Additivity: the sum of single layers vs every layer at once", ""]
    entries = v.additivity
    if not entries:
        return lines + ["Skipped: no position has both its all-layers point and single-layer points.", ""]
    rows = []
    for e in entries:
        if isinstance(e, AdditivitySkipped):
            rows.append([f"`{e.position}`", e.fmt, "–", "–", "–", "–", f"skipped: {e.skipped}"])
        else:
            rows.append([f"`{e.position}`", e.fmt, str(e.n_tokens),
                         *(with_ci(ci) for ci in (e.sum_ci, e.all_ci, e.difference_ci)), e.verdict])
    lines += table(["position", "format", "tokens", "Σ single layers [95 % CI]", "all layers [95 % CI]",
                    "sum − all [95 % CI]", "verdict"], rows)
    done = [e for e in entries if isinstance(e, Additivity)]
    if done:
        counts: dict[str, int] = {}
        for e in done:
            word = e.verdict.split(" ")[0]
            counts[word] = counts.get(word, 0) + 1
        lines += [f"Of {len(done)} position-format pairs: " + ", ".join(f"{n} {w}" for w, n in counts.items()) + ".",
                  ""]
    return lines


def section_model(v: View, skipped_plots: dict[str, str | None]) -> list[str]:
    m, t = v.m, v.m["timing"]
    stops: dict[str, int] = {}
    for r in v.records:
        key = "skipped" if isinstance(r, SkippedPoint) else r.stop
        stops[key] = stops.get(key, 0) + 1
    share = pct(t["points_compute_share"]) if t["points_compute_share"] is not None else "–"
    lines = [f"## {v.label} ({m['weight_type']} weights, {m['arch']}, {v.n_layer} layers)", "",
             f"- Model `{m['path']}` (sha256 `{m['sha256'][:12]}`); {len(m['positions'])} positions "
             f"({len(v.layered)} per layer; left out, named more than once a layer: "
             f"{', '.join(m['left_out']) or 'none'}), {len(m['points'])} points: "
             + ", ".join(f"{n} {k}" for k, n in sorted(stops.items())) + f"; at most {m['max_chunks']} chunks a point.",
             f"- Time: the points took {duration(t['points_wall_s'])} when they were measured, {share} of it inside "
             f"llama_decode; this run took {duration(t['run_wall_s'])} ({duration(t['run_compute_s'])} in "
             "llama_decode)."]
    for r in v.skipped():
        pt = r.point
        lines.append(f"- Skipped: `{pt.position}` {pt.fmt} "
                     f"{'every layer' if pt.layer is None else 'layer ' + str(pt.layer)}: {r.skipped}")
    lines.append("")
    lines += section_non_finite(v)
    for fmt in v.single_formats():
        lines += section_below(v, fmt)
    lines += section_sensitive(v) + section_all_layers(v)
    lines += section_additivity(v)
    for name, caption in skipped_plots.items():
        kind = name.split("/")[1].split("-")[0]
        lines += [f"Plot skipped ({kind}): {caption}.", ""] if caption else [f"![{v.label} {kind}]({name})", ""]
    return lines


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) >= 3 else None


def section_between(views: Sequence[View]) -> list[str]:
    """What changes between two models: weight type, architecture, or both (from the GGUF metadata)."""
    if len(views) < 2:
        return []
    lines = ["## Between models", ""]
    for a, b in combinations(views, 2):
        weights = f"weights {a.m['weight_type']} vs {b.m['weight_type']}"
        archs = f"architectures {a.m['arch']} ({a.label}) vs {b.m['arch']} ({b.label})"
        what = (f"{weights} (same architecture, {a.m['arch']})" if a.m["arch"] == b.m["arch"]
                else f"{archs} (same weights, {a.m['weight_type']})" if a.m["weight_type"] == b.m["weight_type"]
                else f"{archs}, {weights}")
        lines += [f"### {a.label} vs {b.label}: {what}", ""]
        fmt = lead_format([a, b])
        common = [p for p in a.names if p in b.names and kld(a.get(p, fmt)) and kld(b.get(p, fmt))]
        only = sorted(set(a.names) ^ set(b.names))
        if only:
            lines += [f"Positions in one model only: {', '.join(f'`{p}`' for p in only)}.", ""]
        if not common:
            lines += [f"No position has an all-layers {fmt} point in both models.", ""]
            continue
        ratios = {p: kld(a.get(p, fmt)) / kld(b.get(p, fmt)) for p in common}
        lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
        rho = spearman([kld(a.get(p, fmt)) for p in common], [kld(b.get(p, fmt)) for p in common])
        pairs = [(p, il) for p in a.layered if p in b.layered for il in range(min(a.n_layer, b.n_layer))
                 if a.get(p, fmt, il) and b.get(p, fmt, il)]
        rho_sites = spearman([kld(a.get(p, fmt, il)) for p, il in pairs],
                             [kld(b.get(p, fmt, il)) for p, il in pairs])
        top_a = max(a.singles(fmt), key=lambda r: r.kld_ci.estimate, default=None)
        top_b = max(b.singles(fmt), key=lambda r: r.kld_ci.estimate, default=None)
        lines += [f"- All-layers {fmt} KLD, {a.label} / {b.label}, over {len(common)} common positions: median "
                  f"{num(float(np.median(list(ratios.values()))))}, from {num(ratios[lo])} (`{lo}`) to "
                  f"{num(ratios[hi])} (`{hi}`).",
                  f"- Rank agreement (Spearman ρ) of the positions' all-layers {fmt} KLDs: {num(rho, '.2f')}; of the "
                  f"single (position, layer) {fmt} KLDs both measured ({len(pairs)}): {num(rho_sites, '.2f')}.",
                  f"- Most harmful position at every layer ({fmt}): {a.label} `{ranked(a, fmt)[0]}`, {b.label} "
                  f"`{ranked(b, fmt)[0]}`; most harmful single site: "
                  + "; ".join(f"{v.label} `{r.point.position}` layer {r.point.layer} ({num(kld(r))})"
                              for v, r in ((a, top_a), (b, top_b)) if r) + ".",
                  f"- Logits-bf16 reference: {a.label} {ci_text(a.reference())}, {b.label} {ci_text(b.reference())}.",
                  ""]
        lines += table(["position", f"{a.label} {fmt} all layers", f"{b.label} {fmt} all layers", "ratio"],
                       [[f"`{p}`", ci_text(a.get(p, fmt)), ci_text(b.get(p, fmt)), num(ratios[p])]
                        for p in sorted(common, key=lambda p: -ratios[p])])
        lines += section_formats_between(a, b)
    return lines


def tolerant(v: View, fmt: str) -> list[str]:
    """Positions whose all-layers `fmt` point is clearly below the model's own reference."""
    return [p for p in v.names if v.versus_reference(v.points.get((p, fmt, None))) == "clearly below"]


def section_formats_between(a: View, b: View) -> list[str]:
    """Per format: which positions take it at every layer within each model's logits-bf16 yardstick, and
    whether the two models rank the positions alike."""
    fmts = [f for f in a.formats() if f in b.formats()]
    rows = []
    for fmt in fmts:
        common = [p for p in a.names if p in b.names and kld(a.get(p, fmt)) and kld(b.get(p, fmt))]
        if not common:
            continue
        ta, tb = set(tolerant(a, fmt)), set(tolerant(b, fmt))
        rho = spearman([kld(a.get(p, fmt)) for p in common], [kld(b.get(p, fmt)) for p in common])
        names = lambda ps: ", ".join(f"`{p}`" for p in sorted(ps)) or "none"  # noqa: E731
        rows.append([fmt, str(len(common)), names(ta & set(common)), names(tb & set(common)),
                     names((ta ^ tb) & set(common)), num(rho, ".2f")])
    if not rows:
        return []
    return [f"Every layer at once, per format: the positions clearly below each model's own reference "
            f"(`{a.ref_position}` {a.ref_fmt}), and the rank agreement of the positions' KLDs.", ""] + table(
        ["format", "positions in both", f"{a.label}: clearly below", f"{b.label}: clearly below",
         "in one model only", "Spearman ρ"], rows)


def render_atlas(atlas_path: Path, out_dir: Path) -> Path:
    """Write `atlas.md` and its PNGs (`atlas/…`) into `out_dir`; return atlas.md's path."""
    data = load_atlas(Path(atlas_path))
    out_dir = Path(out_dir)
    (out_dir / "atlas").mkdir(parents=True, exist_ok=True)
    try:
        views = [View(m, data["provenance"]["rule"]["reference"]) for m in data["models"]]
        limits = shared_limits(views)
        lines = section_intro(data)
        for v in views:
            plots: dict[str, str | None] = {}
            for fmt in v.single_formats():
                name = image_name(v.label, f"heatmap_{fmt}")
                (out_dir / name).unlink(missing_ok=True)
                plots[name] = (plot_heatmap(v, fmt, limits, out_dir / name) if limits
                               else "no positive single-layer KLD to scale the colours by")
            name = image_name(v.label, "ranking")
            (out_dir / name).unlink(missing_ok=True)
            plots[name] = plot_ranking(v, out_dir / name)
            lines += section_model(v, plots)
        lines += section_between(views)
    except (KeyError, TypeError, IndexError, RecordError) as exc:
        raise HarnessError(f"atlas file {atlas_path} is malformed ({type(exc).__name__}: {exc})") from exc
    lines += ["---", "", f"Data: `{Path(atlas_path).resolve()}`", ""]
    path = out_dir / "atlas.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

