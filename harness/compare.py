"""One comparison engine: native fake quantization (the graph nodes of native/fake-quant.patch)
against the independent reference (harness.reference, numpy through the eval callback on an
unmodified graph), bit for bit and with equal counts of rounded tensors.

A `Case` (rules, tokens, logit rows, whether to record every site) is data; `Sides` runs it on a
model (a native context and a reference context, on any backend) and gives each side's `Run`;
`compare` turns two runs into a typed `Comparison`. The native tests, the architecture sweep
(harness.archs) and the backend checks (harness.backend_check) all use these.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from harness.driver import EVERY_LAYER, Context, FakeQuantError, FakeQuantRule, Model, Target
from harness.reference import ReferenceFakeQuant

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; "
        "the third introduced special relativity. 17 + 25 = 42, and 6 * 7 = 42 as well.")

Sites = list[tuple[str, np.ndarray]]  # (tensor name, its values after rounding), in graph order


def bits(a: np.ndarray) -> np.ndarray:
    """The float32 values as their bit patterns (NaN payloads and -0 included)."""
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@dataclass(frozen=True)
class Case:
    """One comparison: `rules` on the first `n_tokens` tokens (None: all), logits of rows first..;
    with `record`, every rounded tensor of both sides too; `listed`: how many tensors the listing
    gives the rules, checked against both counts when known."""

    rules: tuple[FakeQuantRule, ...]
    n_tokens: int | None = None
    first: int = 0
    record: bool = False
    listed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    @property
    def label(self) -> str:
        """Each rule as target and format (layers and scale where not the defaults), joined by " + "."""
        parts = [" ".join([r.target, r.fmt] + ([f"layers {r.layers}"] if r.layers != EVERY_LAYER else [])
                          + ([f"scale {r.scale}"] if r.scale != 1.0 else [])) for r in self.rules]
        return " + ".join(parts) or "no rules"


def one_rule_cases(targets: Sequence[Target], formats: Sequence[str]) -> list[Case]:
    """Every listed name (at all its tensors) in every format, one at a time: the sweep's cases."""
    return [Case((FakeQuantRule(t.name, fmt),), listed=t.count) for t in targets for fmt in formats]


@dataclass(frozen=True)
class Run:
    """One side's outcome of a case: the logits, how many tensors it rounded (native: the graph's
    sites; reference: the hook's count), every rounded tensor when recorded, or libllama's refusal."""

    logits: np.ndarray
    count: int
    sites: Sites | None = None
    error: str = ""


@dataclass(frozen=True)
class FirstDifference:
    """The first value whose bits differ: where (the logits or a site), its index, both values."""

    where: str
    index: tuple[int, ...]
    native: float
    reference: float
    native_bits: int
    reference_bits: int

    def __str__(self) -> str:
        return (f"{self.where} first differs at {self.index}: native {self.native!r} (0x{self.native_bits:08x}), "
                f"reference {self.reference!r} (0x{self.reference_bits:08x})")


def first_difference(native: np.ndarray, reference: np.ndarray, where: str) -> tuple[int, FirstDifference | None]:
    """How many values of two equal-shaped arrays differ in their bits, and the first of them."""
    differ = bits(native) != bits(reference)
    if not differ.any():
        return 0, None
    x = tuple(int(j) for j in np.argwhere(differ)[0])
    return int(differ.sum()), FirstDifference(where, x, float(native[x]), float(reference[x]),
                                              int(bits(native)[x]), int(bits(reference)[x]))


def site_difference(native: Sites, reference: Sites) -> str:
    """'' when both recorded the same sites (names, shapes, bits) in the same order, else the first
    that differs."""
    for i, ((n_name, n_val), (r_name, r_val)) in enumerate(zip(native, reference)):
        if n_name != r_name or n_val.shape != r_val.shape:
            return f"site {i}: native {n_name} {n_val.shape}, reference {r_name} {r_val.shape}"
        differ, first = first_difference(n_val, r_val, f"site {i} ({n_name})")
        if differ:
            return f"{differ} values differ; {first}"
    return "" if len(native) == len(reference) else f"{len(native)} native sites, {len(reference)} reference sites"


@dataclass(frozen=True)
class Comparison:
    """What a case gave on both sides. `differ` is None when a side refused the rules (`error`)."""

    case: Case
    differ: int | None                     # logits whose bits differ
    first: FirstDifference | None          # the first of them
    native_sites: int
    reference_sites: int
    changed: bool | None                   # the native logits differ from the baseline (None: no baseline)
    nonfinite: tuple[int, int]             # non-finite logits, native and reference
    sites_differ: str = ""                 # site_difference of the recorded sites ('' when equal or not recorded)
    error: str = ""

    @property
    def bits_equal(self) -> bool:
        return self.differ == 0 and not self.sites_differ

    @property
    def counts_equal(self) -> bool:
        listed = self.case.listed
        return self.native_sites == self.reference_sites and (listed is None or self.native_sites == listed)

    @property
    def equal(self) -> bool:
        """Bit-identical logits (and sites, when recorded) and equal counts."""
        return not self.error and self.bits_equal and self.counts_equal

    def describe(self) -> str:
        """One line: the case and everything that differs (or that it is equal)."""
        if self.error:
            return f"{self.case.label}: refused: {self.error}"
        listed = f", listed {self.case.listed}" if self.case.listed is not None else ""
        parts = [f"{self.differ} logits differ" + (f" ({self.first})" if self.first else ""),
                 f"sites {self.native_sites}, reference {self.reference_sites}{listed}"]
        if any(self.nonfinite):
            parts.append(f"non-finite logits: native {self.nonfinite[0]}, reference {self.nonfinite[1]}")
        if self.sites_differ:
            parts.append(self.sites_differ)
        return f"{self.case.label}: " + "; ".join(parts)


def compare(case: Case, native: Run, reference: Run, baseline: np.ndarray | None = None) -> Comparison:
    """The comparison of two runs of `case`; `baseline`: the logits without rules (same rows), to
    tell whether the rules changed anything."""
    error = native.error or reference.error
    if error:
        return Comparison(case, None, None, native.count, reference.count, None, (0, 0), error=error)
    if native.logits.shape != reference.logits.shape:
        raise ValueError(f"{case.label}: native logits {native.logits.shape}, reference {reference.logits.shape}")
    differ, first = first_difference(native.logits, reference.logits, "logits")
    recorded = native.sites is not None and reference.sites is not None
    changed = None if baseline is None else not np.array_equal(bits(native.logits), bits(baseline))
    return Comparison(case, differ, first, native.count, reference.count, changed,
                      (int((~np.isfinite(native.logits)).sum()), int((~np.isfinite(reference.logits)).sum())),
                      site_difference(native.sites, reference.sites) if recorded else "")


class SiteRecorder:
    """A tensor hook on a native context: while `sites` is a list, a copy of each site's result
    ("<name>.fq", the node that rounded <name>) is appended to it as (name, values), in graph order."""

    def __init__(self) -> None:
        self.sites: Sites | None = None

    def wants(self, name: str) -> bool:
        return self.sites is not None and name.endswith(".fq")

    def __call__(self, name: str, data: np.ndarray) -> None:
        assert self.sites is not None
        self.sites.append((name.removesuffix(".fq"), data.copy()))


class RecordingReference(ReferenceFakeQuant):
    """The reference hook; while `sites` is a list, a copy of each tensor it rounded is appended."""

    sites: Sites | None = None

    def __call__(self, name: str, data: np.ndarray) -> None:
        super().__call__(name, data)
        if self.sites is not None:
            self.sites.append((name, data.copy()))


@dataclass
class Sides:
    """A native and a reference context on one model over fixed tokens, each made on first use and
    kept (with `fresh`, a new one for every run instead: what the backend checks do on a GPU).
    `n_ctx`, `threads`: the contexts' (None: the tokens' count, the driver's default)."""

    model: Model
    tokens: list[int]
    n_ctx: int | None = None  # None: len(tokens)
    threads: int | None = None
    fresh: bool = False
    hook: RecordingReference = field(init=False)
    recorder: SiteRecorder = field(init=False, default_factory=SiteRecorder)
    _kept: dict[str, Context] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.hook = RecordingReference([], self.model.n_layer)

    def _make(self, kind: str) -> Context:
        hook = {"native": None, "reference": self.hook, "recording": self.recorder}[kind]
        return self.model.context(self.n_ctx or len(self.tokens), self.threads, tensor_hook=hook)

    def context(self, kind: str) -> Context:
        """The kept context of `kind`: "native", "reference" (the reference hook) or "recording" (a
        native context whose hook records the sites)."""
        if kind not in self._kept:
            self._kept[kind] = self._make(kind)
        return self._kept[kind]

    @property
    def native(self) -> Context:
        return self.context("native")

    @property
    def ref(self) -> Context:
        return self.context("reference")

    @contextmanager
    def _using(self, kind: str) -> Iterator[Context]:
        ctx = self._make(kind) if self.fresh else self.context(kind)
        try:
            yield ctx
        finally:
            if self.fresh:
                ctx.close()

    @cached_property
    def baseline(self) -> np.ndarray:
        """The native logits of every token without fake quantization."""
        return self.run_native(Case(())).logits

    @cached_property
    def targets(self) -> list[Target]:
        """The model's fake-quant targets, as the native listing gives them."""
        return self.native.fake_quant_targets()

    def run_native(self, case: Case) -> Run:
        """The native side: the rules set on the context (refused: the error), the logits, the sites."""
        tokens = self.tokens[:case.n_tokens]
        with self._using("recording" if case.record else "native") as ctx:
            try:
                ctx.set_fake_quant(case.rules)
            except FakeQuantError as err:
                return Run(np.empty((0, self.model.n_vocab), np.float32), 0, error=str(err))
            if case.record:
                self.recorder.sites = []
            try:
                return Run(ctx.logits(tokens, case.first), ctx.fake_quant_sites, self.recorder.sites)
            finally:
                self.recorder.sites = None
                if not self.fresh:
                    ctx.set_fake_quant([])

    def run_reference(self, case: Case) -> Run:
        """The reference side: the rules set on the hook, the logits, the count (and its sites)."""
        tokens = self.tokens[:case.n_tokens]
        self.hook.set_rules(case.rules)
        self.hook.sites = [] if case.record else None
        try:
            with self._using("reference") as ctx:
                return Run(ctx.logits(tokens, case.first), self.hook.applied, self.hook.sites)
        finally:
            self.hook.set_rules([])
            self.hook.sites = None

    def compare(self, case: Case) -> Comparison:
        """Both sides of `case`, compared; `changed` against the baseline's rows of the case."""
        native, reference = self.run_native(case), self.run_reference(case)
        baseline = self.baseline[case.first:] if case.n_tokens is None else None
        return compare(case, native, reference, baseline)

    def close(self) -> None:
        for ctx in self._kept.values():
            ctx.close()
        self._kept.clear()
