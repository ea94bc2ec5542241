"""What the native tests share: a short text, a bit view for exact comparisons, and a Pair of
contexts on one model (native fake quantization, and the eval-callback reference on the unmodified
graph) that tests/native/conftest.py's `pairs` makes once per model and module."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from harness.driver import FakeQuantRule, Model, Target
from harness.reference import ReferenceFakeQuant

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; "
        "the third introduced special relativity. 17 + 25 = 42, and 6 * 7 = 42 as well.")


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


class Pair:
    """A native context and a reference context on one model, TEXT's first n_ctx tokens, and their
    logits without fake quantization."""

    def __init__(self, model: Model, n_ctx: int) -> None:
        self.model = model
        self.tokens = model.tokenize(TEXT)[:n_ctx]
        self.native = model.context(n_ctx)
        self.hook = ReferenceFakeQuant([], model.n_layer)
        self.ref = model.context(n_ctx, tensor_hook=self.hook)
        self.baseline = self.native.logits(self.tokens)

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

    def compare(self, rules: list[FakeQuantRule], first: int = 0) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(native logits, reference logits, native sites, reference count) for positions first.."""
        native, sites = self.native_run(rules, first)
        reference, applied = self.reference_logits(rules, first)
        return native, reference, sites, applied
