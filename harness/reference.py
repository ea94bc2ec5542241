"""The independent reference: fake quantization applied in numpy (harness.rounding) through
libllama's eval callback on an unmodified graph (native fake quant off). It shares no code with
the native path: names, layer specs and rounding are re-implemented here from the design."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from harness.driver import FakeQuantRule
from harness.rounding import fake_quantize

_NAME = re.compile(r"(?P<target>.+?)(?:-(?P<il>\d+))?")


def parse_layers(spec: str, n_layer: int) -> frozenset[int] | None:
    """None for all layers ("-1"), else the selected layer indices."""
    if spec == "-1":
        return None
    layers: set[int] = set()
    for item in spec.split(","):
        lo, _, hi = item.partition("-")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b < n_layer:
            raise ValueError(f"layer spec {spec!r} outside 0..{n_layer - 1}")
        layers.update(range(a, b + 1))
    return frozenset(layers)


class ReferenceFakeQuant:
    """A tensor hook that rounds the tensors the rules select, in place, and counts them."""

    def __init__(self, rules: Sequence[FakeQuantRule], n_layer: int) -> None:
        self.n_layer = n_layer
        self.set_rules(rules)

    def set_rules(self, rules: Sequence[FakeQuantRule]) -> None:
        """Replace the rules (empty: the hook wants nothing) and reset the count."""
        self.rules = [(r, parse_layers(r.layers, self.n_layer)) for r in rules]
        self.applied = 0

    def _rule(self, name: str) -> FakeQuantRule | None:
        m = _NAME.fullmatch(name)
        if m is None:
            return None
        il = m["il"]
        for rule, layers in self.rules:
            if m["target"] != rule.target:
                continue
            if layers is None or (il is not None and int(il) in layers):
                return rule
        return None

    def wants(self, name: str) -> bool:
        return self._rule(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        rule = self._rule(name)
        assert rule is not None
        data[...] = fake_quantize(data, rule.fmt, rule.scale)
        self.applied += 1


class Capture:
    """A tensor hook that copies the tensors whose names match `pattern`."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.tensors: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return self.pattern.fullmatch(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        self.tensors[name] = data.copy()
