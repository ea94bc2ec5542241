"""Layer skipping: a point whose rules are all at layer L or above computes only layers L...

Layers 0..L-1 of such a point compute exactly what the baseline computes, so the baseline's residual
stream entering each layer (`l_out-<L-1>`, every row of each scored chunk, exact F32) is stored once
per model and chunk (its own cache entry, keyed like the baseline), and libllama starts the graph at
layer L from it (`llama_fake_quant_start_at`: the residual becomes a graph input and the nodes only
the layers below need are dropped; native/README.md). The rows are those of the scoring decode: every
token of the chunk up to the last layer, whose `l_out` keeps only the scored rows.

The residuals are captured with an eval callback on a context of the scoring context's size; the
proof that this is exact is a test (tests/atlas/test_start_at.py): for every L, with no rule, the
logits equal the baseline's bit for bit, and atlas points measured both ways give the same records.
libllama refuses where it would not be exact (a rule below L, a graph without `l_out-<L-1>`, a GPU
backend, an eval callback); the point is then measured on the whole graph (StartRefused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from harness import matrix
from harness.cache import KEY_FILE, HarnessError, cache_root, progress, publish
from harness.driver import FakeQuantRule, Start, StartRefused
from harness.reference import Capture
from harness.reference import parse_layers as rule_layers

NO_LAYER = ("result_norm", "result_output")  # positions of no layer, computed after the last one
RESIDUAL = "l_out-{}"  # the graph's name of layer il's output: the residual entering layer il + 1
RESIDUALS = r"l_out-\d+"  # every layer's (a Capture pattern)
SKIP_ENV = "FQ_SKIP_LAYERS"  # "0": every point on the whole graph (the bench's "without")


def skipping_enabled() -> bool:
    value = os.environ.get(SKIP_ENV, "1")
    if value not in ("0", "1"):
        raise HarnessError(f"{SKIP_ENV}={value!r} is not allowed (allowed: 1 = skip the layers a point does not "
                           f"change, the default; 0 = compute every layer)")
    return value == "1"


def start_layer(rules: Iterable[FakeQuantRule], n_layer: int) -> int:
    """The first layer any of `rules` changes: a rule's lowest layer, 0 for every layer; n_layer when
    every rule names a position of NO_LAYER."""
    first = n_layer
    for rule in rules:
        if rule.target in NO_LAYER:
            continue
        layers = rule_layers(rule.layers, n_layer)
        first = min(first, 0 if layers is None else min(layers))
    return first


class Residuals:
    """The baseline's residual entering every layer of the session's chunks, captured on first use."""

    def __init__(self, session) -> None:
        self.session = session
        self.capture = Capture(RESIDUALS)

    @property
    def key(self) -> dict[str, str]:
        return dict(self.session.key, residuals=RESIDUAL.format("N"))

    def directory(self, i: int) -> Path:
        return cache_root() / "residuals" / self.session.entry_name(self.key, f"chunk{i}")

    @cached_property
    def _context(self):
        return self.session.model.context(matrix.N_CTX, tensor_hook=self.capture)

    def _chunk(self, i: int) -> Path:
        def make(tmp: Path) -> None:
            session = self.session
            progress(f"{session.name}: residuals of chunk {i + 1} (once per model)")
            ctx = self._context
            self.capture.tensors.clear()
            ctx.logits(session.chunks[i], first=matrix.SCORED_FROM, copy=False)
            for il in range(session.model.n_layer):
                name = RESIDUAL.format(il)
                np.save(tmp / f"{name}.npy", self.capture.tensors.pop(name))
            self.capture.tensors.clear()
            (tmp / KEY_FILE).write_text(json.dumps(dict(self.key, chunk=str(i)), indent=1))

        return publish(self.directory(i), make)

    def ensure(self, chunks: int) -> None:
        """Capture (or find) the residuals of the first `chunks` chunks now, before any point's clock."""
        for i in range(chunks):
            self._chunk(i)

    def start(self, i: int, layer: int) -> Start:
        """Start chunk i's scoring decode at `layer` (>= 1) from the stored residual."""
        return Start(layer, np.load(self._chunk(i) / f"{RESIDUAL.format(layer - 1)}.npy"))

    def disk_bytes(self) -> int:
        """Bytes the stored residuals of this session take now."""
        return sum(f.stat().st_size for i in range(len(self.session.chunks)) if self.directory(i).exists()
                   for f in self.directory(i).iterdir())

    def close(self) -> None:
        if "_context" in self.__dict__:
            self._context.close()
            del self.__dict__["_context"]


@dataclass
class StartCheck:
    """Starting at each layer L = 1..n_layer without a rule, against the whole graph's logits."""

    exact: list[int] = field(default_factory=list)            # bit-identical logits
    differs: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)     # L -> why libllama (or the graph) would not
    skipped: dict[int, int] = field(default_factory=dict)     # L -> nodes not computed
    nodes: int = 0                                            # nodes of the whole graph

    @property
    def kind(self) -> str:
        """"every" layer exact, "some" (refused at the others), "none" (refused at every layer), "differs"."""
        return "differs" if self.differs else "none" if not self.exact else "some" if self.refused else "every"

    def text(self) -> str:
        """One cell of the architecture table."""
        parts = [f"**differs** at L = {_ranges(self.differs)}"] if self.differs else []
        if self.exact:
            last = self.exact[-1]
            parts.append(f"exact at L = {_ranges(self.exact)} ({self.skipped[last]} of {self.nodes} nodes skipped "
                         f"at L = {last})")
        for reason in sorted(set(self.refused.values())):
            layers = sorted(layer for layer, why in self.refused.items() if why == reason)
            parts.append(f"refused at L = {_ranges(layers)}: {reason}")
        return "; ".join(parts) or "–"


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def check_start(model, tokens: list[int], threads: int | None = None) -> StartCheck:
    """Every start layer of `model` on `tokens` (logits of every position), without a rule."""
    capture = Capture(RESIDUALS)
    check = StartCheck()
    capturing = model.context(len(tokens), threads, tensor_hook=capture)
    native = model.context(len(tokens), threads)
    try:
        whole = native.logits(tokens)
        check.nodes = native.graph_nodes
        capturing.logits(tokens, copy=False)
        for layer in range(1, model.n_layer + 1):
            residual = capture.tensors.get(RESIDUAL.format(layer - 1))
            if residual is None:
                check.refused[layer] = f"the graph names no {RESIDUAL.format('<L-1>')}"
                continue
            try:
                got = native.logits(tokens, start=Start(layer, residual))
            except StartRefused as exc:
                check.refused[layer] = str(exc).splitlines()[-1].split(": ", 1)[-1].strip()
                continue
            check.skipped[layer] = native.skipped_nodes
            (check.exact if np.array_equal(got.view(np.uint32), whole.view(np.uint32)) else check.differs).append(layer)
    finally:
        capturing.close()
        native.close()
    return check
