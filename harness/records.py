"""The records that cross the pipeline's boundaries, typed: a matrix group's record (runner → cache →
verdicts → report), its token summary and intervals, and the atlas's point records (measured, skipped
or non-finite as three types, not three key sets).

Each type reads (`from_json`) and writes (`to_json`) the JSON the cache, results.json and atlas.json
already hold, field for field: a record loaded and written back is the same dict
(tests/unit/test_records.py over a fixture; `python -m harness.records` over the whole cache).
docs/results-format.md describes the layouts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from harness.driver import FakeQuantRule


class RecordError(ValueError):
    """A JSON record that does not have the layout of its type."""


def _kwargs(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `cls`, refusing keys it does not have or lacks."""
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{where}: {cls.__name__} has no field {', '.join(map(repr, unknown))} "
                          f"(fields: {', '.join(sorted(names))})")
    return dict(data)


def _drop_none(data: dict[str, Any], optional: frozenset[str]) -> dict[str, Any]:
    """Leave out the optional fields that are absent (None), as the writers never wrote them."""
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


@dataclass(frozen=True)
class Estimate:
    """A bootstrap interval as results.json stores it: `[estimate, lo, hi]` (harness.intervals.Interval
    holds the block length and p-value beside)."""

    estimate: float
    lo: float
    hi: float

    @classmethod
    def from_json(cls, data: Any, where: str = "interval") -> Estimate:
        if not isinstance(data, list) or len(data) != 3:
            raise RecordError(f"{where}: expected [estimate, lo, hi], got {data!r}")
        return cls(*data)

    def to_json(self) -> list[float]:
        return [self.estimate, self.lo, self.hi]


@dataclass(frozen=True)
class Timing:
    wall_s: float
    compute_s: float

    @classmethod
    def from_json(cls, data: Mapping, where: str = "timing") -> Timing:
        return cls(**_kwargs(cls, data, where))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Blocks:
    """The block lengths the token intervals used (harness.verdicts.with_intervals)."""

    kld: int
    top1: int
    ln_ppl_ratio: int


@dataclass(frozen=True)
class TokenSummary:
    """harness.metrics.summarize over scored tokens, in the style of llama-perplexity's KLD output;
    results.json adds the intervals (and, for the H5 prompts, the per-prompt count)."""

    n_tokens: int
    kld_mean: float
    kld_max: float
    kld_p99_9: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    kld_median: float
    top1_agreement: float
    ppl_base: float
    ppl_test: float
    ln_ppl_ratio: float
    ppl_ratio: float
    dp_mean: float
    dp_rms: float
    n_prompts: int | None = None  # before the intervals: results.json's tasks write it first
    kld_ci: Estimate | None = None
    top1_ci: Estimate | None = None
    ln_ppl_ratio_ci: Estimate | None = None
    blocks: Blocks | None = None

    OPTIONAL: ClassVar = frozenset({"kld_ci", "top1_ci", "ln_ppl_ratio_ci", "blocks", "n_prompts"})
    INTERVALS: ClassVar = ("kld_ci", "top1_ci", "ln_ppl_ratio_ci")

    @classmethod
    def from_json(cls, data: Mapping, where: str = "tokens") -> TokenSummary:
        kw = _kwargs(cls, data, where)
        for name in cls.INTERVALS:
            if kw.get(name) is not None:
                kw[name] = Estimate.from_json(kw[name], f"{where}.{name}")
        if kw.get("blocks") is not None:
            kw["blocks"] = Blocks(**_kwargs(Blocks, kw["blocks"], f"{where}.blocks"))
        return cls(**kw)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.INTERVALS:
            if out[name] is not None:
                out[name] = out[name].to_json()
        if self.blocks is not None:
            out["blocks"] = asdict(self.blocks)
        return _drop_none(out, self.OPTIONAL)


@dataclass(frozen=True)
class AnswerLogprob:
    """The arithmetic answers' mean log-probability, unrounded and rounded (H5); results.json adds the
    interval of the per-prompt change."""

    base_mean: float
    test_mean: float
    delta_ci: Estimate | None = None

    @classmethod
    def from_json(cls, data: Mapping, where: str = "answer_logprob") -> AnswerLogprob:
        kw = _kwargs(cls, data, where)
        if kw.get("delta_ci") is not None:
            kw["delta_ci"] = Estimate.from_json(kw["delta_ci"], f"{where}.delta_ci")
        return cls(**kw)

    def to_json(self) -> dict:
        out = asdict(self)
        if self.delta_ci is not None:
            out["delta_ci"] = self.delta_ci.to_json()
        return _drop_none(out, frozenset({"delta_ci"}))


@dataclass(frozen=True)
class Tasks:
    """The H5 prompts of a group: token summaries per kind of prompt and the answers' log-probability."""

    arithmetic: TokenSummary
    text: TokenSummary
    answer_logprob: AnswerLogprob

    @classmethod
    def from_json(cls, data: Mapping, where: str = "tasks") -> Tasks:
        kw = _kwargs(cls, data, where)
        return cls(TokenSummary.from_json(kw["arithmetic"], f"{where}.arithmetic"),
                   TokenSummary.from_json(kw["text"], f"{where}.text"),
                   AnswerLogprob.from_json(kw["answer_logprob"], f"{where}.answer_logprob"))

    def to_json(self) -> dict:
        return {"arithmetic": self.arithmetic.to_json(), "text": self.text.to_json(),
                "answer_logprob": self.answer_logprob.to_json()}


@dataclass(frozen=True)
class Continuation:
    """One generated continuation and how it matches the baseline's (harness.metrics.generation_match)."""

    id: str
    kind: str
    sampling: str
    prompt: str
    tokens: list[int]
    text: str
    first_divergence: int | None
    match_rate: float


@dataclass(frozen=True)
class GroupRecord:
    """One group of the matrix measured on one model (harness.runner): the cache's `record.json`, and
    with intervals (Tokens' *_ci) an entry of results.json's `groups`. `numerics` keeps the layout of
    harness.numerics.layer_numerics."""

    group: str
    model: str
    kind: str
    description: str
    rules: tuple[FakeQuantRule, ...]
    layer: int | None
    scale: float | None
    fake_quant_sites: int
    tokens: TokenSummary
    tasks: Tasks | None = None
    generation: tuple[Continuation, ...] | None = None
    numerics: dict | None = None
    timing: Timing | None = None

    OPTIONAL: ClassVar = frozenset({"tasks", "generation", "numerics", "timing"})

    @classmethod
    def from_json(cls, data: Mapping, where: str = "group record") -> GroupRecord:
        kw = _kwargs(cls, data, where)
        kw["rules"] = tuple(FakeQuantRule(**r) for r in kw["rules"])
        kw["tokens"] = TokenSummary.from_json(kw["tokens"], f"{where}.tokens")
        if kw.get("tasks") is not None:
            kw["tasks"] = Tasks.from_json(kw["tasks"], f"{where}.tasks")
        if kw.get("generation") is not None:
            kw["generation"] = tuple(Continuation(**_kwargs(Continuation, g, f"{where}.generation"))
                                     for g in kw["generation"])
        if kw.get("timing") is not None:
            kw["timing"] = Timing.from_json(kw["timing"], f"{where}.timing")
        return cls(**kw)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rules"] = [asdict(r) for r in self.rules]
        out["tokens"] = self.tokens.to_json()
        if self.tasks is not None:
            out["tasks"] = self.tasks.to_json()
        if self.generation is not None:
            out["generation"] = [asdict(g) for g in self.generation]
        if self.timing is not None:
            out["timing"] = self.timing.to_json()
        return _drop_none(out, self.OPTIONAL)


# atlas points ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointId:
    """Which point a record is of (harness.atlas.Point's fields): `layer` None is every layer at once."""

    position: str
    fmt: str
    layer: int | None = None


@dataclass(frozen=True)
class NonFinite:
    """Where the fake-quantized logits stopped being finite: `rows` of the `of` scored rows of `chunk`."""

    chunk: int
    rows: int
    of: int


@dataclass(frozen=True)
class SkippedPoint:
    """A point that cannot be measured, and why (a format's row multiple, or libllama's refusal)."""

    point: PointId
    skipped: str

    def to_json(self) -> dict:
        return {"point": asdict(self.point), "skipped": self.skipped}


@dataclass(frozen=True)
class NonFinitePoint:
    """A point whose fake-quantized logits were not finite: the worst result, without a KLD."""

    point: PointId | None
    rules: tuple[FakeQuantRule, ...]
    sites: int
    chunks: int
    stop: str
    non_finite: NonFinite
    timing: Timing

    def to_json(self) -> dict:
        head = {} if self.point is None else {"point": asdict(self.point)}
        return head | {"rules": [asdict(r) for r in self.rules], "sites": self.sites, "chunks": self.chunks,
                       "stop": self.stop, "non_finite": asdict(self.non_finite), "timing": self.timing.to_json()}


@dataclass(frozen=True)
class MeasuredPoint:
    """A point measured to a KLD: its interval, block length, token summary and (in the point cache,
    not in atlas.json's summaries) the per-token KLDs. `point` is None for a set of rules measured
    as one run (the advisor's)."""

    point: PointId | None
    rules: tuple[FakeQuantRule, ...]
    sites: int
    chunks: int
    stop: str | None
    kld_ci: Estimate
    block: int
    tokens: TokenSummary
    timing: Timing
    kld: list[float] | None = None

    def to_json(self) -> dict:
        head = {} if self.point is None else {"point": asdict(self.point)}
        out = head | {"rules": [asdict(r) for r in self.rules], "sites": self.sites, "chunks": self.chunks,
                      "stop": self.stop, "kld_ci": self.kld_ci.to_json(), "block": self.block,
                      "tokens": self.tokens.to_json()}
        if self.kld is not None:
            out["kld"] = self.kld
        return out | {"timing": self.timing.to_json()}


PointRecord = MeasuredPoint | SkippedPoint | NonFinitePoint


def point_from_json(data: Mapping, where: str = "point record") -> PointRecord:
    """The typed record of a point.json (or an atlas.json point summary, or a measured set of rules)."""
    kw = _kwargs(MeasuredPoint, data, where) if "skipped" not in data and "non_finite" not in data else dict(data)
    point = PointId(**_kwargs(PointId, kw["point"], f"{where}.point")) if kw.get("point") is not None else None
    if "skipped" in kw:
        if set(kw) != {"point", "skipped"}:
            raise RecordError(f"{where}: a skipped point has only 'point' and 'skipped', got {sorted(kw)}")
        return SkippedPoint(point, kw["skipped"])
    common = dict(point=point, rules=tuple(FakeQuantRule(**r) for r in kw["rules"]), sites=kw["sites"],
                  chunks=kw["chunks"], stop=kw["stop"], timing=Timing.from_json(kw["timing"], f"{where}.timing"))
    if "non_finite" in kw:
        extra = sorted(set(kw) - {"point", "rules", "sites", "chunks", "stop", "non_finite", "timing"})
        if extra:
            raise RecordError(f"{where}: a non-finite point has no {', '.join(extra)}")
        return NonFinitePoint(**common, non_finite=NonFinite(**_kwargs(NonFinite, kw["non_finite"], where)))
    return MeasuredPoint(**common, kld_ci=Estimate.from_json(kw["kld_ci"], f"{where}.kld_ci"), block=kw["block"],
                         tokens=TokenSummary.from_json(kw["tokens"], f"{where}.tokens"), kld=kw.get("kld"))


Site = tuple[str, int | None]  # (position, layer); layer None for a position of no layer


@dataclass(frozen=True)
class Held:
    """Where the advised set's measured KLD lies against the budget: its lower bound, mean and upper bound
    each at most the budget or not. The interval decides: within it (upper bound), over it (lower bound
    above), or undecided (the interval straddles the budget; the mean says on which side it leans)."""

    lower: bool
    mean: bool
    upper: bool

    @classmethod
    def of(cls, kld: Estimate, budget: float) -> Held:
        return cls(kld.lo <= budget, kld.estimate <= budget, kld.hi <= budget)

    @property
    def verdict(self) -> str:
        if self.upper:
            return "held (the upper bound is within the budget)"
        if not self.lower:
            return "exceeded (the lower bound is above the budget)"
        return f"undecided (the interval straddles the budget; the mean is {'within' if self.mean else 'above'} it)"


@dataclass(frozen=True)
class Advice:
    """The budget advisor's answer (harness.atlas.advise_atlas): the sites that fit, smallest KLD first,
    their predicted KLD (the sum of the single-site means) and the rules and flags that reproduce the set;
    then the set measured as one run (`measured`, `held`, `prediction_error`) or, when no site fits,
    the smallest single-site KLD (`smallest`)."""

    model: str
    fmt: str
    budget: float
    candidates: int                 # single sites with a KLD
    non_finite: tuple[Site, ...]    # single sites left out: non-finite logits alone
    measured_now: int               # single-site points measured for this answer
    sites: tuple[Site, ...]
    predicted: float
    rules: tuple[FakeQuantRule, ...]
    flags: str
    model_path: str
    smallest: float | None = None
    measured: MeasuredPoint | NonFinitePoint | None = None
    held: Held | None = None
    prediction_error: float | None = None


# verdicts (harness.verdicts → results.json → the report and the tests) ----------------------------

@dataclass(frozen=True)
class Comparison:
    """One comparison of a hypothesis, "a hurts more than b": the two means, the bootstrap interval of
    their difference, its p-value before and after Holm, and its verdict."""

    a: str
    b: str
    unit: str            # what was resampled: per-token (paired) or per-prompt (independent)
    mean_a: float
    mean_b: float
    difference: float
    ci95: tuple[float, float]
    block: int
    p: float
    p_holm: float
    verdict: str

    @classmethod
    def from_json(cls, data: Mapping, where: str = "comparison") -> Comparison:
        kw = _kwargs(cls, data, where)
        kw["ci95"] = tuple(kw["ci95"])
        return cls(**kw)

    def to_json(self) -> dict:
        return asdict(self) | {"ci95": list(self.ci95)}


@dataclass(frozen=True)
class Verdict:
    """A hypothesis decided on one model, with the comparisons that decided it; `recorded` is the
    verdict recorded with the snapshots (None: none recorded, or not looked up)."""

    hypothesis: str
    model: str
    statement: str
    comparisons: tuple[Comparison, ...]
    verdict: str
    recorded: str | None = None

    @classmethod
    def from_json(cls, data: Mapping, where: str = "verdict") -> Verdict:
        kw = _kwargs(cls, data, where)
        kw["comparisons"] = tuple(Comparison.from_json(c, f"{where}.comparisons[{i}]")
                                  for i, c in enumerate(kw["comparisons"]))
        return cls(**kw)

    def to_json(self) -> dict:
        return asdict(self) | {"comparisons": [c.to_json() for c in self.comparisons]}


@dataclass(frozen=True)
class SweepTop:
    """The per-layer sweep's most sensitive layer against the runner-up (harness.verdicts.sweep_top)."""

    top: int
    runner_up: int
    kld_top: float
    kld_runner_up: float
    difference_ci: Estimate
    block: int
    p: float
    distinguishable: bool

    @classmethod
    def from_json(cls, data: Mapping, where: str = "sweep_top") -> SweepTop:
        kw = _kwargs(cls, data, where)
        return cls(**kw | {"difference_ci": Estimate.from_json(kw["difference_ci"], f"{where}.difference_ci")})

    def to_json(self) -> dict:
        return asdict(self) | {"difference_ci": self.difference_ci.to_json()}


@dataclass(frozen=True)
class DosePoint:
    """Mean KLD at one scale of the rounding step (harness.verdicts.dose_response)."""

    scale: float
    kld_ci: Estimate

    @classmethod
    def from_json(cls, data: Mapping, where: str = "dose point") -> DosePoint:
        kw = _kwargs(cls, data, where)
        return cls(kw["scale"], Estimate.from_json(kw["kld_ci"], f"{where}.kld_ci"))

    def to_json(self) -> dict:
        return {"scale": self.scale, "kld_ci": self.kld_ci.to_json()}


@dataclass(frozen=True)
class AcrossModels:
    """One hypothesis's recorded verdicts across models (harness.verdicts.across_models): `finding` is
    "same", "weight format", "architecture", both joined by "and", "confounded" or "too few"; `differs` and
    `compared` are keyed by "weight format" and "architecture"; `formats` is each model's weight format as
    compared (every quantized type is "quantized")."""

    hypothesis: str
    statement: str
    finding: str
    verdicts: dict[str, str]
    formats: dict[str, str]
    differs: dict[str, list[list[str]]]
    compared: dict[str, int]
    unrecorded: list[str]

    @classmethod
    def from_json(cls, data: Mapping, where: str = "across_models entry") -> AcrossModels:
        return cls(**_kwargs(cls, data, where))

    def to_json(self) -> dict:
        return asdict(self)


# atlas additivity (harness.atlas.assemble → atlas.json → the atlas report) --------------------------

@dataclass(frozen=True)
class Additivity:
    """Per position and format: the per-token sum of the single-layer KLDs against every layer at once, on
    the tokens all of them measured, with the interval of the paired difference (sum − all)."""

    position: str
    fmt: str
    n_tokens: int
    sum_ci: Estimate
    all_ci: Estimate
    difference_ci: Estimate
    verdict: str    # additive, sub-additive or super-additive, with its reason

    def to_json(self) -> dict:
        return asdict(self) | {k: getattr(self, k).to_json() for k in ("sum_ci", "all_ci", "difference_ci")}


@dataclass(frozen=True)
class AdditivitySkipped:
    """A position and format whose sum could not be formed, and why."""

    position: str
    fmt: str
    skipped: str

    def to_json(self) -> dict:
        return asdict(self)


def additivity_from_json(data: Mapping, where: str = "additivity entry") -> Additivity | AdditivitySkipped:
    if isinstance(data, Mapping) and "skipped" in data:
        return AdditivitySkipped(**_kwargs(AdditivitySkipped, data, where))
    kw = _kwargs(Additivity, data, where)
    return Additivity(**kw | {k: Estimate.from_json(kw[k], f"{where}.{k}") for k in ("sum_ci", "all_ci", "difference_ci")})


# the cache, read back through the types -------------------------------------------------------------

def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text (NaN equal to NaN, unlike ==)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def round_trip_cache(root: Path) -> tuple[int, list[str]]:
    """Every group record and atlas point under the cache `root`, loaded through its type and written
    back: how many were read, and the files whose JSON came back different (or did not load)."""
    checked, bad = 0, []
    files = [(p, GroupRecord.from_json) for p in sorted(root.glob("results/*/record.json"))]
    files += [(p, point_from_json) for p in sorted(root.glob("atlas/*/*/point.json"))]
    for path, load in files:
        data = json.loads(path.read_text())
        checked += 1
        try:
            if not same_json(load(data, str(path)).to_json(), data):
                bad.append(f"{path}: written back differently")
        except (RecordError, TypeError, KeyError) as exc:
            bad.append(f"{path}: {exc}")
    return checked, bad


if __name__ == "__main__":  # python -m harness.records [CACHE_DIR]
    from harness.cache import cache_root

    n, problems = round_trip_cache(Path(sys.argv[1]) if len(sys.argv) > 1 else cache_root())
    print(f"{n} records read, {n - len(problems)} written back identical", *problems[:20], sep="\n")
    sys.exit(1 if problems else 0)
