"""The experiment matrix as data: one table of groups, the models they run on, how much text
each kind of group evaluates, and the hypotheses.

Groups depend on the model only through its layer count (first5/last5, the per-layer sweep).
The verdicts recorded for each model are data too, kept with the snapshots
(tests/snapshots/verdicts/MODEL.json, written by --snapshot-update), not here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.driver import EVERY_LAYER, FakeQuantRule


# model name -> layer count (checked against the loaded model): two architectures (SmolLM2-135M,
# llama; Gemma 3 270M, with post-norms and a 262k vocabulary), each as shipped (quantized weights:
# activations re-quantized to Q8 by the matmul) and as an F32 copy (the rounding alone)
MODELS: dict[str, int] = {"smollm2-q4_1": 30, "smollm2-f32": 30, "gemma3-q4_k_m": 18, "gemma3-f32": 18}
MODELS_ENV = "FQ_EXPERIMENT_MODELS"  # e.g. "user" (with FQ_MODEL=path) or "smollm2-f32"

N_CTX = 512          # tokens per chunk, cut as llama-perplexity cuts them
SCORED_FROM = 64     # positions 64..510 of each chunk predict the next token and are scored
#                      (llama-perplexity scores 256..510 only: the cross-check uses that subset)
TOKENS_PER_CHUNK = N_CTX - 1 - SCORED_FROM  # 447 scored tokens per chunk
MAIN_CHUNKS = 9      # 9 x 447 = 4023 scored tokens for the design's groups
SWEEP_CHUNKS = 2     # 894 scored tokens (the first 2 chunks) per point of the layer and scale sweeps
GENERATION_TOKENS = 50
SEED = 42


@dataclass(frozen=True)
class Group:
    id: str
    kind: str  # design | control | sweep | scale
    description: str
    rules: tuple[FakeQuantRule, ...] = field(default=())
    chunks: int = MAIN_CHUNKS
    generation: bool = True  # greedy continuations and the seeded scenario
    numerics: bool = True    # per-layer error accumulation and ffn_norm statistics
    tasks: bool = False      # the H5 prompts (arithmetic vs text), measured where H5 looks
    layer: int | None = None  # the one layer a sweep group rounds

    def key(self) -> str:
        """The group as its cached results' key holds it: every field but `layer`, which its rules
        already name."""
        return json.dumps({k: v for k, v in asdict(self).items() if k != "layer"}, sort_keys=True)

    @property
    def scale(self) -> float | None:
        return self.rules[0].scale if self.kind == "scale" else None


def ffn(fmt: str = "bf16", layers: str = EVERY_LAYER, scale: float = 1.0) -> FakeQuantRule:
    return FakeQuantRule("ffn_norm", fmt, layers, scale)


LOGITS = FakeQuantRule("result_output", "bf16")
SCALES = (0.25, 0.5)  # the dose-response sweep; scale 0 is the baseline, 1.0 is `all`


def scale_id(scale: float) -> str:
    return f"scale{round(scale * 100):03d}"


def layer_id(il: int) -> str:
    """The id of the sweep group that rounds layer `il` alone."""
    return f"layer{il:02d}"


def groups(n_layer: int) -> tuple[Group, ...]:
    """Every group of the matrix for a model with `n_layer` layers, in a fixed order."""
    table = [
        # the baseline group re-computes one chunk: its job is to reproduce the cached baseline bits
        Group("baseline", "design", "no fake quantization", chunks=1),
        Group("all", "design", "ffn_norm bf16, all layers", (ffn(),), tasks=True),
        Group("first5", "design", "ffn_norm bf16, layers 0-4", (ffn(layers="0-4"),)),
        Group("last5", "design", f"ffn_norm bf16, layers {n_layer - 5}-{n_layer - 1}",
              (ffn(layers=f"{n_layer - 5}-{n_layer - 1}"),)),
        Group("all_logits", "design", "ffn_norm bf16 all layers + logits bf16", (ffn(), LOGITS)),
        Group("all_f16", "design", "ffn_norm f16, all layers", (ffn("f16"),)),
        Group("logits", "control", "logits bf16 only", (LOGITS,)),
    ]
    table += [Group(scale_id(s), "scale", f"ffn_norm bf16 all layers, scale {s}",
                    (ffn(scale=s),), chunks=SWEEP_CHUNKS, generation=False, numerics=False)
              for s in SCALES]
    table += [Group(layer_id(il), "sweep", f"ffn_norm bf16, layer {il} alone", (ffn(layers=str(il)),),
                    chunks=SWEEP_CHUNKS, generation=False, numerics=False, layer=il)
              for il in range(n_layer)]
    return tuple(table)


def experiment_models() -> dict[str, int]:
    """The models the matrix runs on: MODELS, or the names in $FQ_EXPERIMENT_MODELS (a user
    model's GGUF is checked here, so a broken file is named at collection)."""
    names = os.environ.get(MODELS_ENV)
    if not names:
        return dict(MODELS)
    from harness.models import layer_count

    return {name: MODELS.get(name) or layer_count(name) for name in names.split(",")}


def model_label(name: str) -> str:
    """The name a model's snapshots and recorded verdicts are kept under: its matrix name, or
    the file name (without .gguf) of a user model, so two user models never share records."""
    if name == "user":
        from harness.models import USER_MODEL_ENV

        name = os.environ.get(USER_MODEL_ENV, "user")
    return Path(name).stem if name.endswith(".gguf") or os.sep in name else name


@dataclass(frozen=True)
class Hypothesis:
    id: str
    statement: str
    comparisons: tuple[tuple[str, str], ...]  # (group a, group b): "a hurts more than b" (mean KLD)
    task: bool = False  # H5: arithmetic vs text prompts within group comparisons[0][0]


HYPOTHESES: tuple[Hypothesis, ...] = (
    Hypothesis("H1", "ffn_norm fake quantization (all layers) hurts more than logits fake quantization",
               (("all", "logits"),)),
    Hypothesis("H2", "the first 5 layers hurt more than the last 5", (("first5", "last5"),)),
    Hypothesis("H3", "more layers hurt more: all > first5 and all > last5", (("all", "first5"), ("all", "last5"))),
    Hypothesis("H4", "bf16 hurts more than f16", (("all", "all_f16"),)),
    Hypothesis("H5", "arithmetic prompts are more sensitive than text prompts", (("all", "all"),), task=True),
)
