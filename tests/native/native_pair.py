"""What the native tests share: a short text, a bit view for exact comparisons, and a Pair of
contexts on one model (native fake quantization, and the eval-callback reference on the unmodified
graph) that tests/native/conftest.py's `pairs` makes once per model and module; each side can also
record every site's result, in graph order, to compare site by site."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from harness.driver import Context, FakeQuantRule, Model, Target
from harness.reference import ReferenceFakeQuant

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; "
        "the third introduced special relativity. 17 + 25 = 42, and 6 * 7 = 42 as well.")


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


Sites = list[tuple[str, np.ndarray]]  # (tensor name, its values after rounding), in graph order


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


class Pair:
    """A native context and a reference context on one model, TEXT's first n_ctx tokens, and their
    logits without fake quantization."""

    def __init__(self, model: Model, n_ctx: int) -> None:
        self.model = model
        self.tokens = model.tokenize(TEXT)[:n_ctx]
        self.native = model.context(n_ctx)
        self.hook = RecordingReference([], model.n_layer)
        self.ref = model.context(n_ctx, tensor_hook=self.hook)
        self.baseline = self.native.logits(self.tokens)
        self.recorder = SiteRecorder()

    @cached_property
    def recording(self) -> Context:
        """A second native context whose eval callback records the sites (made on first use)."""
        return self.model.context(len(self.tokens), tensor_hook=self.recorder)

    def close(self) -> None:
        self.native.close()
        self.ref.close()
        if "recording" in self.__dict__:
            self.recording.close()

    @cached_property
    def targets(self) -> list[Target]:
        """The model's fake-quant targets, as the native listing gives them."""
        return self.native.fake_quant_targets()

    def native_logits(self, rules: list[FakeQuantRule], first: int = 0) -> np.ndarray:
        return self.native_run(rules, first)[0]

    def native_run(self, rules: list[FakeQuantRule], first: int = 0) -> tuple[np.ndarray, int]:
        """Native logits of positions first.. and how many tensors the graph pass rounded."""
        self.native.set_fake_quant(rules)
        try:
            return self.native.logits(self.tokens, first), self.native.fake_quant_sites
        finally:
            self.native.set_fake_quant([])

    def reference_logits(self, rules: list[FakeQuantRule], first: int = 0) -> tuple[np.ndarray, int]:
        """The reference's logits of positions first.. and how many tensors it rounded."""
        self.hook.set_rules(rules)
        try:
            return self.ref.logits(self.tokens, first), self.hook.applied
        finally:
            self.hook.set_rules([])

    def record_native(self, rules: list[FakeQuantRule], n_tokens: int, first: int) -> tuple[np.ndarray, Sites, int]:
        """On the first n_tokens tokens, the recording context's logits of positions first.., its sites as
        (name, result) in graph order, and its site count (the implementation LLAMA_FAKE_QUANT_IMPL says)."""
        self.recording.set_fake_quant(rules)
        self.recorder.sites = []
        try:
            return (self.recording.logits(self.tokens[:n_tokens], first), self.recorder.sites,
                    self.recording.fake_quant_sites)
        finally:
            self.recording.set_fake_quant([])
            self.recorder.sites = None

    def record_reference(self, rules: list[FakeQuantRule], n_tokens: int, first: int) -> tuple[np.ndarray, Sites]:
        """On the first n_tokens tokens, the reference's logits of positions first.. and the tensors it
        rounded, in graph order."""
        self.hook.set_rules(rules)
        self.hook.sites = []
        try:
            return self.ref.logits(self.tokens[:n_tokens], first), self.hook.sites
        finally:
            self.hook.set_rules([])
            self.hook.sites = None

    def compare(self, rules: list[FakeQuantRule], first: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(native logits, reference logits, native sites, reference count) for positions first.."""
        native, sites = self.native_run(rules, first)
        reference, applied = self.reference_logits(rules, first)
        return native, reference, sites, applied
