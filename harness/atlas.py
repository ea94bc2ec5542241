"""The precision atlas: how much fake quantization hurts at every position of a model's graph, at
every layer, and the largest set of (position, layer) sites that fits a KLD budget.

The matrix answers one question (`ffn_norm`); choosing where BF16 is safe needs the whole map.

Positions: every name the computed prompt-processing (`pp`) graph gives to an F32 activation once
per layer (the listing's layers are all layers and its count is n_layer), plus `result_norm` and
`result_output` (no layer). Points:
- each position at each layer alone, in bf16 and f16;
- each position at every layer at once, in bf16, f16 and q8_0. q8_0 rounds blocks of 32 values
  along ne0, so a position whose ne0 is not a multiple of 32 gets a point recorded as *skipped*
  with that reason; a rule libllama refuses is recorded as skipped with libllama's message.
The reference point, `result_output` bf16 (the logits rounded), is always measured.
A point whose fake-quantized logits are not finite (the format's range was exceeded: f16 holds at
most 65,504, and Gemma 3's residual stream passes 1e5) is a result, the worst one, recorded as
*non-finite* with the chunk and the number of rows; it has no KLD, counts as above the reference,
enters no sum and is never advised.

Each point is measured against the model's FP32-compute baseline of the matrix (ModelSession:
the same corpus chunks, scored positions and baseline logits on disk), token by token
(harness.metrics): mean KLD, top-1 agreement, PPL ratio. Its interval is harness.intervals'
circular block bootstrap (Politis-White block length, 95 %) with RESAMPLES resamples: the matrix
uses 20,000 for p-values near Holm thresholds; the atlas tests no hypothesis, and at 2,000 the
bounds scatter between seeds by 0.02-0.09 standard errors (measured on 8 points, 10 seeds)
while an interval costs about 0.04 s instead of 0.35 s (a chunk's decode takes 1-2 s).

Adaptive tokens (stop_reason): a point measures chunk 0 (447 scored tokens), then after each
chunk recomputes the interval of its mean KLD over the chunks so far and stops when
- the mean is exactly 0 (every token's distribution unchanged: nothing to tighten), or
- the half-width (hi - lo) / 2 is at most REL_HALF_WIDTH (25 %) of the mean, or
- it has measured max_chunks chunks (MAX_CHUNKS = 4 by default: 1,788 tokens).
The rule looks at the data, so a point that stopped early had an interval that happened to be
tight then; the report shows each point's chunk count and interval as measured.

Points are cached one by one (PointStore: JSON published atomically under the harness cache,
keyed like the runner's results by model, build, corpus, measurement version and the rule's constants), so a
killed run resumes and loses at most the point in progress, and xdist workers share the work.
A ModelAtlas plans from ModelFacts (what a loaded session tells of a model) and measures in this
process; harness.atlas_cluster measures the same points as tasks on a Dask cluster, whose client
never loads the model and publishes each record into the same store.

Additivity (additivity): per position and format, the per-token sum over layers of the
single-layer KLDs against the all-layers KLD, on the tokens every point involved measured (the
first chunks they share); the difference (sum - all) is bootstrapped per token, paired, so the
correlation between layers measured on the same tokens is kept (adding independent intervals
would ignore it).

Advisor (select_sites, advise): the largest set of single sites whose predicted KLD (the sum of
their single-site mean KLDs) fits the budget: the k sites of smallest KLD have the smallest sum
of any k sites, so taking them smallest first maximizes the count. The set is then measured as
one run (one rule per position with its layer list) with the same adaptive rule.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from harness import matrix
from harness.cache import KEY_FILE, HarnessError, cache_root, progress, publish, write_atomic
from harness.formats import TABLE
from harness.driver import EVERY_LAYER, FakeQuantError, FakeQuantRule, StartRefused, Target
from harness.intervals import CONFIDENCE, SEED, Interval, mean_ci, paired_ci
from harness.metrics import TokenStats, summarize
from harness.records import (Additivity, AdditivitySkipped, Advice, Estimate, Held, MeasuredPoint, NonFinite,
                             NonFinitePoint, PointId, Site, SkippedPoint, Timing, point_from_json)
from harness.reference import parse_layers as reference_layers
from harness.measurement import ATLAS_VERSION
from harness.residuals import NO_LAYER
from harness.runner import ModelSession, entry_name

MAX_CHUNKS = 4
REL_HALF_WIDTH = 0.25
RESAMPLES = 2_000
# every format at every layer at once; single layers for the ones that decide deployments (issue 21: FP8,
# MX FP4, NVFP4, INT8 beside bf16 and f16), which multiply the cost by the layer count
FORMATS = tuple(TABLE)
SINGLE_FORMATS = ("bf16", "f16", "fp8_e4m3", "mxfp4", "nvfp4", "int8")
Q8_0_BLOCK = TABLE["q8_0"].row_multiple
NO_SINGLE_LAYERS = "none"  # --layers none: no single-layer points, every layer at once only
REFERENCE = ("result_output", "bf16")  # the logits rounded to bf16: the yardstick of the report


@dataclass(frozen=True)
class Position:
    """A fake-quantizable F32 activation of the pp graph: at every layer (`layered`) or of none."""

    name: str
    ne0: int
    layered: bool


def positions_of(targets: Iterable[Target], n_layer: int) -> list[Position]:
    """The atlas's positions in the listing's order: names the pp graph computes once per layer,
    then result_norm and result_output."""
    every = tuple(range(n_layer))
    listed = [t for t in targets if t.graph == "pp"]
    out = [Position(t.name, t.shape[0], True) for t in listed if t.layers == every and t.count == n_layer]
    out += [Position(t.name, t.shape[0], False) for t in listed if t.name in NO_LAYER and not t.layers]
    if REFERENCE[0] not in {p.name for p in out}:
        raise HarnessError(f"the pp graph has no '{REFERENCE[0]}' without a layer: the atlas's reference point "
                           f"(logits rounded to {REFERENCE[1]}) cannot be measured")
    return out


def left_out(targets: Iterable[Target], n_layer: int) -> list[str]:
    """Names the pp graph gives at every layer but more than once a layer (e.g. Qcur before and after
    RoPE): one rule would round all of them, so they are no single position; the report lists them."""
    every = tuple(range(n_layer))
    return [f"{t.name} ({t.count} tensors)" for t in targets
            if t.graph == "pp" and t.layers == every and t.count != n_layer]


@dataclass(frozen=True)
class Point:
    """One measurement: `position` rounded to `fmt` at `layer` alone, or (None) at every layer at
    once; for a position of no layer, None is its one tensor."""

    position: str
    fmt: str
    layer: int | None = None

    @property
    def slug(self) -> str:
        return f"{self.position}.{self.fmt}.{'all' if self.layer is None else f'L{self.layer:03d}'}"

    @property
    def rule(self) -> FakeQuantRule:
        return FakeQuantRule(self.position, self.fmt, EVERY_LAYER if self.layer is None else str(self.layer))


def skip_reason(point: Point, ne0: int) -> str | None:
    """Why a point cannot be measured (None: it can)."""
    multiple = TABLE[point.fmt].row_multiple
    if multiple and ne0 % multiple:
        return f"{point.fmt} rounds blocks of {multiple} values along ne0; {point.position} has ne0 = {ne0}"
    return None


def plan(positions: Sequence[Position], layers: Sequence[int], formats: Sequence[str]) -> list[Point]:
    """Every point of an atlas: single layers (bf16, f16) of layered positions, then every layer at
    once in every format; the reference point is added when the selection lacks it."""
    points = [Point(p.name, f, il) for p in positions if p.layered for f in formats if f in SINGLE_FORMATS
              for il in layers]
    points += [Point(p.name, f) for p in positions for f in formats]
    reference = Point(*REFERENCE)
    return points if reference in points else points + [reference]


# measuring -------------------------------------------------------------------------------------


def stop_reason(ci: Interval, chunks: int, max_chunks: int) -> str | None:
    """The adaptive rule (module docstring): "zero", "tight", "max", or None to measure another chunk."""
    if ci.estimate == 0.0:
        return "zero"
    if ci.estimate > 0 and (ci.hi - ci.lo) / 2 <= REL_HALF_WIDTH * ci.estimate:
        return "tight"
    if chunks >= max_chunks:
        return "max"
    return None


def measure_rules(session: ModelSession, rules: Sequence[FakeQuantRule], max_chunks: int,
                  point: PointId | None = None, start: int | None = None) -> MeasuredPoint | NonFinitePoint:
    """Measure `rules` on the matrix's chunks, adding chunks until stop_reason says stop: the
    per-token KLDs, their interval, the matrix's token summary, sites and timing. The decodes start
    at layer `start` (None: session.start_layer; harness.residuals), or on the whole graph where
    libllama refuses that."""
    baseline = session.baseline  # before the clock starts: shared by every point
    ctx = session.ctx
    start = session.start_layer(rules) if start is None else start
    started, compute_before = time.perf_counter(), ctx.compute_seconds
    ctx.set_fake_quant(list(rules))
    non_finite: NonFinite | None = None
    try:
        sites = ctx.fake_quant_sites
        parts: list[TokenStats] = []
        for i, chunk in enumerate(session.chunks[:max_chunks]):
            try:  # the matrix's scored positions, used at once; from `start` on (harness.residuals)
                test = session._scored_logits(chunk, copy=False, start=session.start(i, start))
            except StartRefused as exc:  # libllama's reason is logged once; no chunk was measured
                session.refuse_start(start, rules, exc)
                return measure_rules(session, rules, max_chunks, point, start=0)
            base = baseline.chunk(i)
            try:
                parts.append(session.token_stats(base, test, np.asarray(chunk[matrix.SCORED_FROM + 1:])))
            except ValueError:  # token_stats refuses non-finite logits: the test's are a result, the baseline's not
                rows = int(np.count_nonzero(~np.isfinite(test).all(axis=1)))
                if rows == 0:
                    raise
                non_finite = NonFinite(i, rows, len(test))
                break
            stats = TokenStats.concat(parts)
            ci = mean_ci(stats.kld, resamples=RESAMPLES)
            stop = stop_reason(ci, i + 1, max_chunks)
            if stop:
                break
    finally:
        ctx.set_fake_quant([])
    timing = Timing(time.perf_counter() - started, ctx.compute_seconds - compute_before)
    if non_finite is not None:
        return NonFinitePoint(point, tuple(rules), sites, non_finite.chunk + 1, "non-finite", non_finite, timing)
    return MeasuredPoint(point, tuple(rules), sites, len(parts), stop, Estimate(*ci.triple()), ci.block,
                         summarize(stats), timing, stats.kld.tolist())


def non_finite_text(record: NonFinitePoint) -> str:
    nf = record.non_finite
    return f"non-finite logits ({nf.rows} of {nf.of} rows of chunk {nf.chunk})"


def measure_point(session: ModelSession, point: Point, ne0: int, max_chunks: int) -> dict:
    """A point's record: measured, or skipped with the reason."""
    reason = skip_reason(point, ne0)
    if reason is None:
        try:
            return measure_rules(session, [point.rule], max_chunks, PointId(**asdict(point))).to_json()
        except FakeQuantError as exc:
            reason = f"libllama refused the rule: {exc}"
    return SkippedPoint(PointId(**asdict(point)), reason).to_json()


class PointStore:
    """Point records, one JSON file each (`<slug>/point.json`) under `directory`, published
    atomically (harness.cache.publish): a killed run keeps every finished point, and two
    processes asking for the same point measure it once."""

    def __init__(self, directory: Path, key: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.key = key  # written beside the points (KEY_FILE), for `python -m harness cache`

    def path(self, point: Point) -> Path:
        return self.directory / point.slug / "point.json"

    def has(self, point: Point) -> bool:
        return self.path(point).exists()

    def get(self, point: Point, measure: Callable[[Point], dict]) -> tuple[dict, bool]:
        """The point's record, measured now (True) or read from the store (False)."""
        measured = False

        def make(tmp: Path) -> None:
            nonlocal measured
            (tmp / "point.json").write_text(json.dumps(measure(point)))
            measured = True

        self.directory.mkdir(parents=True, exist_ok=True)
        if self.key is not None and not (self.directory / KEY_FILE).exists():
            write_atomic(self.directory / KEY_FILE, json.dumps(self.key, indent=1))
        publish(self.path(point).parent, make)
        return json.loads(self.path(point).read_text()), measured

    def put(self, point: Point, record: dict) -> dict:
        """Publish a record measured elsewhere (a cluster's worker); the stored record, which is the
        one published first when another process had published the point already."""
        return self.get(point, lambda _: record)[0]


def store_key(session: ModelSession | ModelFacts, max_chunks: int) -> dict[str, str]:
    """What decides a point's record: the session's key (model, build, corpus, chunks, results
    version), the atlas's measurement version (harness.measurement) and the stopping rule's constants."""
    return dict(session.key, atlas=str(ATLAS_VERSION), max_chunks=str(max_chunks),
                rule=f"{REL_HALF_WIDTH}/{RESAMPLES}/{CONFIDENCE}/{SEED}")


def store_for(session: ModelSession | ModelFacts, max_chunks: int, root: Path | None = None) -> PointStore:
    root = root or cache_root() / "atlas"
    key = store_key(session, max_chunks)
    return PointStore(root / session.entry_name(key), key)


def eta_text(elapsed: float, measured: int, todo: int) -> str:
    """Remaining time from the mean time of the points measured so far."""
    if todo == 0:
        return "done"
    if measured == 0:
        return f"{todo} to measure, ETA after the first"
    seconds = elapsed / measured * todo
    return f"{todo} to measure, ETA {int(seconds // 60)} min {int(seconds % 60):02d} s"


def run_points(points: Sequence[Point], store: PointStore, measure: Callable[[Point], dict],
               label: str = "atlas") -> tuple[list[dict], int]:
    """Every point's record (from the store, or measured and stored now, in order) and how many
    were measured now; progress (done / total, ETA) on stderr."""
    todo = sum(not store.has(p) for p in points)
    started, measured, records = time.perf_counter(), 0, []
    for i, point in enumerate(points, 1):
        record, fresh = store.get(point, measure)
        records.append(record)
        if fresh:
            measured += 1
            todo = max(0, todo - 1)
        progress(f"{label}: {i}/{len(points)} points, {point.slug} {'measured' if fresh else 'cached'}; "
                 f"{eta_text(time.perf_counter() - started, measured, todo)}")
    return records, measured


# the atlas of one model -----------------------------------------------------------------------


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
    """A layer spec (EVERY_LAYER or None: all; "N", "A-B", "A,B", mixtures) as sorted layers,
    expanded by the reference's parser; a clear error naming the spec and the model's layers."""
    spec = EVERY_LAYER if spec is None else spec
    if spec != EVERY_LAYER and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec):
        raise HarnessError(f"malformed layer spec {spec!r} (allowed: -1, N, A-B, A,B or a mixture)")
    try:
        chosen = reference_layers(spec, n_layer)
    except ValueError:
        raise HarnessError(f"layer spec {spec!r} selects layers outside 0-{n_layer - 1} (the model has {n_layer})") from None
    return list(range(n_layer)) if chosen is None else sorted(chosen)


def layer_spec(layers: Iterable[int]) -> str:
    """The shortest spec of a set of layers ("0-4,10"), as libllama and the flags parse it."""
    spans: list[list[int]] = []
    for il in sorted(set(layers)):
        if spans and il == spans[-1][1] + 1:
            spans[-1][1] = il
        else:
            spans.append([il, il])
    if not spans:
        raise ValueError("an empty set of layers has no spec")
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_choice(kind: str, asked: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """`asked` in the order of `allowed`; an unknown name is an error naming it and the allowed ones."""
    unknown = [a for a in asked if a not in allowed]
    if unknown:
        raise HarnessError(f"unknown {kind} {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")
    return [a for a in allowed if a in asked]


@dataclass(frozen=True)
class ModelFacts:
    """What the plan, the point store and atlas.json need of a model, read from its loaded session:
    in this process, or by a cluster's worker (harness.atlas_cluster), so that the client never
    loads the model."""

    name: str
    path: str
    sha256: str
    arch: str
    weight_type: str
    n_layer: int
    n_chunks: int                   # the baseline's corpus chunks
    targets: tuple[Target, ...]     # the context's fake-quant listing
    key: dict[str, str]             # ModelSession.key: model, build, corpus, measurement version, settings
    build: dict[str, str]           # the build's fingerprint
    corpus: dict[str, str]          # name, sha256
    backend: dict                   # ModelSession.backend: the build's backend, offloaded layers, devices

    @classmethod
    def of(cls, session: ModelSession) -> ModelFacts:
        return cls(session.name, str(session.file.path), session.file.sha256, session.info.arch,
                   session.info.weight_type, session.model.n_layer, len(session.chunks),
                   tuple(session.ctx.fake_quant_targets()), dict(session.key), dict(session.build.fingerprint),
                   {"name": session.corpus.name, "sha256": session.corpus.sha256}, dict(session.backend))

    def entry_name(self, key: dict, part: str = "") -> str:
        return entry_name(self.name, key, part)  # the same store directory as the session's


class ModelAtlas:
    """One model's atlas: its positions, its points and their store; with `session`, measured in
    this process (harness.atlas_cluster's ClusterAtlas measures on a Dask cluster instead)."""

    def __init__(self, facts: ModelFacts, max_chunks: int = MAX_CHUNKS, root: Path | None = None,
                 session: ModelSession | None = None) -> None:
        if not 1 <= max_chunks <= facts.n_chunks:
            raise HarnessError(f"max chunks {max_chunks} outside 1-{facts.n_chunks} (the chunks the "
                               f"matrix's baseline has)")
        self.facts = facts
        self.session = session
        self.max_chunks = max_chunks
        self.positions = positions_of(facts.targets, facts.n_layer)
        self.left_out = left_out(facts.targets, facts.n_layer)
        self.ne0 = {p.name: p.ne0 for p in self.positions}
        self.store = store_for(facts, max_chunks, root)

    @classmethod
    def of(cls, session: ModelSession, max_chunks: int = MAX_CHUNKS, root: Path | None = None) -> ModelAtlas:
        return cls(ModelFacts.of(session), max_chunks, root, session)

    def select(self, positions: Sequence[str] | None) -> list[Position]:
        names = [p.name for p in self.positions]
        chosen = check_choice("position", positions, names) if positions else names
        return [p for p in self.positions if p.name in chosen]

    def plan(self, positions: Sequence[str] | None, layers: str | None, formats: Sequence[str] | None) -> list[Point]:
        """The atlas's points restricted to `positions`, `layers`, `formats` (None: every one); layers
        NO_SINGLE_LAYERS: every layer at once only."""
        fmts = check_choice("format", formats, FORMATS) if formats else list(FORMATS)
        singles = [] if layers == NO_SINGLE_LAYERS else parse_layers(layers, self.facts.n_layer)
        return plan(self.select(positions), singles, fmts)

    def candidates(self, fmt: str, positions: Sequence[str] | None, layers: str | None) -> list[Point]:
        """The advisor's single sites: each chosen position at each chosen layer, or alone if of no layer."""
        chosen, chosen_layers = self.select(positions), parse_layers(layers, self.facts.n_layer)
        points = [Point(p.name, fmt, il) for p in chosen if p.layered for il in chosen_layers]
        return points + [Point(p.name, fmt) for p in chosen if not p.layered]

    def measure(self, point: Point) -> dict:
        return measure_point(self.session, point, self.ne0[point.position], self.max_chunks)

    def run(self, points: Sequence[Point]) -> tuple[list[dict], int]:
        """Every point's record and how many were measured now (harness.atlas.run_points)."""
        pending = [p for p in points if not self.store.has(p)]
        if pending:
            self.session.baseline  # made (or found) before the clock of the ETA starts, and so are
            if any(self.session.start_layer([p.rule]) for p in pending):  # the residuals, if a point skips
                self.session.residuals.ensure(self.max_chunks)
        return run_points(points, self.store, self.measure, f"{self.facts.name} atlas")

    def measure_set(self, rules: Sequence[FakeQuantRule]) -> dict:
        """Several rules measured as one run (the advised set); not stored."""
        return measure_rules(self.session, rules, self.max_chunks).to_json()

    def compute_seconds(self) -> float:
        """Seconds inside llama_decode so far, for a run's timing."""
        return self.session.ctx.compute_seconds


def additivity(position: str, fmt: str, singles: Sequence[Sequence[float]], whole: Sequence[float]) -> Additivity:
    """Sum of per-layer KLDs vs the all-layers KLD on the tokens all of them measured (the
    per-token arrays are chunk-ordered, so their common prefix): intervals of each, and of the
    paired per-token difference (sum - all)."""
    if not singles:
        raise ValueError("additivity needs at least one single-layer point")
    n = min(len(whole), *(len(s) for s in singles))
    total = np.sum([np.asarray(s[:n], dtype=np.float64) for s in singles], axis=0)
    every = np.asarray(whole[:n], dtype=np.float64)
    diff = paired_ci(total, every, resamples=RESAMPLES)
    return Additivity(position, fmt, n, Estimate(*mean_ci(total, resamples=RESAMPLES).triple()),
                      Estimate(*mean_ci(every, resamples=RESAMPLES).triple()), Estimate(*diff.triple()),
                      additivity_verdict(diff))


def additivity_verdict(diff: Interval) -> str:
    """From the interval of sum - all: "additive" when it covers 0, else the direction."""
    if diff.lo > 0:
        return "sub-additive (all layers at once hurt less than the sum)"
    if diff.hi < 0:
        return "super-additive (all layers at once hurt more than the sum)"
    return "additive (the difference's interval covers 0)"


def summary(record: dict) -> dict:
    """A point record without its per-token array: what atlas.json keeps."""
    return {k: v for k, v in record.items() if k != "kld"}


def assemble(atlas: ModelAtlas, records: Sequence[dict], run_seconds: dict[str, float]) -> dict:
    """One model's part of atlas.json: provenance, positions, point summaries, additivity and timing."""
    f = atlas.facts
    by_point = {Point(**r["point"]): r for r in records}
    n_layer = f.n_layer
    additive = []
    for p in (p for p in atlas.positions if p.layered):
        for fmt in SINGLE_FORMATS:
            whole = by_point.get(Point(p.name, fmt))
            if whole is None:
                continue
            singles = [by_point.get(Point(p.name, fmt, il)) for il in range(n_layer)]
            missing = [il for il, r in enumerate(singles) if r is None]
            overflowed = [il for il, r in enumerate(singles) if r is not None and "non_finite" in r]
            if missing:
                why = f"layers {layer_spec(missing)} not measured (the sum needs every layer)"
            elif overflowed:
                why = f"non-finite logits at layers {layer_spec(overflowed)} (no finite sum)"
            elif "non_finite" in whole:
                why = "non-finite logits with every layer at once (no finite KLD to compare)"
            else:
                additive.append(additivity(p.name, fmt, [r["kld"] for r in singles], whole["kld"]).to_json())
                continue
            additive.append(AdditivitySkipped(p.name, fmt, why).to_json())
    measured = [r for r in records if "skipped" not in r]
    wall = sum(r["timing"]["wall_s"] for r in measured)
    compute = sum(r["timing"]["compute_s"] for r in measured)
    return {
        "model": f.name, "label": matrix.model_label(f.name), "path": f.path, "sha256": f.sha256,
        "arch": f.arch, "weight_type": f.weight_type, "n_layer": n_layer, "store": str(atlas.store.directory),
        "max_chunks": atlas.max_chunks, "positions": [asdict(p) for p in atlas.positions], "left_out": atlas.left_out,
        "points": [summary(r) for r in records], "additivity": additive,
        "timing": {"points_wall_s": wall, "points_compute_s": compute,
                   "points_compute_share": compute / wall if wall else None, **run_seconds},
    }


def provenance(facts: ModelFacts) -> dict:
    """What every model of one atlas shares: build, corpus, chunks, the stopping rule."""
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "build": facts.build, "backend": facts.backend,
            "corpus": dict(facts.corpus),
            "n_ctx": matrix.N_CTX, "scored_from": matrix.SCORED_FROM,
            "tokens_per_chunk": matrix.TOKENS_PER_CHUNK,
            "rule": {"rel_half_width": REL_HALF_WIDTH, "resamples": RESAMPLES, "confidence": CONFIDENCE,
                     "seed": SEED, "q8_0_block": Q8_0_BLOCK, "reference": list(REFERENCE),
                     "row_multiples": {f.name: f.row_multiple for f in TABLE.values() if (f.row_multiple or 0) > 1}}}


def model_atlas(session: ModelSession, positions: Sequence[str] | None = None, layers: str | None = None,
                formats: Sequence[str] | None = None, max_chunks: int = MAX_CHUNKS,
                root: Path | None = None) -> tuple[dict, int]:
    """Measure (or read) one model's atlas in this process (measure_atlas)."""
    return measure_atlas(ModelAtlas.of(session, max_chunks, root), positions, layers, formats)


def measure_atlas(atlas: ModelAtlas, positions: Sequence[str] | None = None, layers: str | None = None,
                  formats: Sequence[str] | None = None) -> tuple[dict, int]:
    """One model's atlas restricted to `positions`, `layers`, `formats`, measured (or read from the
    store): its atlas.json part and the number of points measured now."""
    started = time.perf_counter()
    compute_before = atlas.compute_seconds()
    records, measured = atlas.run(atlas.plan(positions, layers, formats))
    run = {"run_wall_s": time.perf_counter() - started, "run_compute_s": atlas.compute_seconds() - compute_before}
    return assemble(atlas, records, run), measured


# the budget advisor ---------------------------------------------------------------------------

def select_sites(kld: Mapping[Site, float], budget: float) -> list[Site]:
    """The largest set of sites whose summed KLD (math.fsum) is at most `budget`: the k smallest
    have the smallest sum of any k sites, so the answer is the longest prefix of the sites in
    ascending KLD that fits (ties broken by name and layer, so the answer is deterministic)."""
    if not budget >= 0:
        raise ValueError(f"budget must be a KLD >= 0, got {budget}")
    order = sorted(kld, key=lambda s: (kld[s], s[0], -1 if s[1] is None else s[1]))
    values = [kld[s] for s in order]
    best = 0
    for k in range(1, len(order) + 1):
        if math.fsum(values[:k]) <= budget:
            best = k
    return order[:best]


def rules_for(sites: Iterable[Site], fmt: str) -> list[FakeQuantRule]:
    """One rule per position, with its layers as one spec (every layer for a position of no layer)."""
    by_position: dict[str, list[int]] = {}
    whole: list[str] = []
    for position, layer in sites:
        if layer is None:
            whole.append(position)
        else:
            by_position.setdefault(position, []).append(layer)
    rules = [FakeQuantRule(p, fmt, layer_spec(ls)) for p, ls in sorted(by_position.items())]
    return rules + [FakeQuantRule(p, fmt) for p in sorted(set(whole))]


def cli_flags(rules: Iterable[FakeQuantRule]) -> str:
    """The llama.cpp tools' flags for the same rules (native/README.md: --fake-quant-tensor NAME:TYPE[:LAYERS])."""
    return " ".join(f"--fake-quant-tensor {r.target}:{r.fmt}"
                    + ("" if r.layers == EVERY_LAYER else f":{r.layers}") for r in rules)


def check_advice(fmt: str, budget: float) -> None:
    """The advisor's format and budget, checked before any model loads."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown format {fmt!r} for the advisor (allowed: {', '.join(FORMATS)})")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise HarnessError(f"budget {budget!r} is not allowed: it must be a finite KLD >= 0 (nats)")


def advise(session: ModelSession, fmt: str, budget: float, positions: Sequence[str] | None = None,
           layers: str | None = None, max_chunks: int = MAX_CHUNKS, root: Path | None = None) -> Advice:
    """advise_atlas in this process."""
    return advise_atlas(ModelAtlas.of(session, max_chunks, root), fmt, budget, positions, layers)


def advise_atlas(atlas: ModelAtlas, fmt: str, budget: float, positions: Sequence[str] | None = None,
                 layers: str | None = None) -> Advice:
    """The advised set for `budget` from the single-site points (measured now where missing),
    then that set measured as one run: predicted vs measured KLD and the flags that reproduce it."""
    check_advice(fmt, budget)
    records, measured_now = atlas.run(atlas.candidates(fmt, positions, layers))
    points = [point_from_json(r) for r in records]
    kld = {(r.point.position, r.point.layer): r.kld_ci.estimate for r in points if isinstance(r, MeasuredPoint)}
    excluded = tuple((r.point.position, r.point.layer) for r in points if isinstance(r, NonFinitePoint))
    sites = select_sites(kld, budget)
    rules = rules_for(sites, fmt)
    advice = Advice(atlas.facts.name, fmt, budget, len(kld), excluded, measured_now, tuple(sites),
                    math.fsum(kld[s] for s in sites), tuple(rules), cli_flags(rules), atlas.facts.path)
    if not sites:
        return replace(advice, smallest=min(kld.values(), default=None))
    progress(f"{atlas.facts.name}: measuring the advised set ({len(sites)} sites)")
    run = point_from_json(summary(atlas.measure_set(rules)))
    if isinstance(run, NonFinitePoint):  # each site alone was finite, together they are not: the budget did not hold
        return replace(advice, measured=run, held=Held(False, False, False))
    return replace(advice, measured=run, held=Held.of(run.kld_ci, budget),
                   prediction_error=run.kld_ci.estimate - advice.predicted)
