"""A rule's name means the tensors of the computed graph that carry it, for every name the graph
has: native fake quantization (the graph pass in native/fake-quant.patch) against the eval-callback
reference, bit for bit, with the same number of tensors rounded; both implementations of the nodes
(the fused CPU node, and the portable casts and copies that other backends run); crafted bit
patterns through the nodes; partial batches and generation."""

from __future__ import annotations

import os

import numpy as np
import pytest
from native_pair import TEXT, bits

from harness.driver import FakeQuantRule
from harness.reference import Capture
from harness.rounding import fake_quantize

pytestmark = pytest.mark.native

N_CTX = 64
MODELS = ("smollm2-f32", "smollm2-q4_1", "gemma3-q4_k_m")
# every name of the pp graph of each model (from llama_fake_quant_list); a test below checks that the
# listing is exactly this, so a graph that gains or loses a name fails there, not silently here
NAMES = {
    "smollm2-f32": ("Kcur", "Qcur", "Vcur", "attn_norm", "attn_out", "embd", "ffn_gate", "ffn_inp", "ffn_norm",
                    "ffn_out", "ffn_swiglu", "ffn_up", "kqv_out", "l_out", "norm", "result_norm", "result_output"),
}
NAMES["smollm2-q4_1"] = NAMES["smollm2-f32"]


@pytest.fixture(params=["fused", "portable"])
def impl(request, monkeypatch):
    """Which nodes libllama builds: the fused CPU node, or the casts and copies GPU backends get
    (read by libllama at every graph build, so setting it here takes effect at the next rule change)."""
    monkeypatch.setenv("LLAMA_FAKE_QUANT_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("model", MODELS)
def test_listing_names_every_activation(pairs, model):
    pair = pairs(model)
    pp = [t for t in pair.targets if t.graph == "pp"]
    tg = [t for t in pair.targets if t.graph == "tg"]
    assert pp and tg
    names = {t.name for t in pp}
    assert {"ffn_norm", "result_output", "attn_norm"} <= names
    if model in NAMES:
        assert tuple(sorted(names)) == NAMES[model]
    by_name = {t.name: t for t in pp}
    assert by_name["ffn_norm"].layers == tuple(range(pair.model.n_layer))
    assert by_name["ffn_norm"].shape == (pair.model.n_embd, N_CTX)
    assert by_name["result_output"].layers == () and by_name["result_output"].shape == (pair.model.n_vocab, N_CTX)
    # nothing that is not an activation: no weights, inputs, cache, and none of the pass's own nodes
    assert not any("." in t.name or t.name.startswith(("cache_", "inp_tokens", "attn_inp")) for t in pair.targets)


def _every_name_cases() -> list[tuple[str, str]]:
    return [(m, n) for m in ("smollm2-f32", "smollm2-q4_1") for n in NAMES[m]]


@pytest.mark.parametrize(("model", "name"), _every_name_cases())
def test_every_name_native_equals_reference(pairs, impl, model, name):
    """bf16 at every layer of one name: identical logit bits, identical counts, and the count is the
    number of tensors the listing gives that name."""
    pair = pairs(model)
    native, reference, sites, applied = pair.compare([FakeQuantRule(name, "bf16")])
    np.testing.assert_array_equal(bits(native), bits(reference))
    listed = next(t.count for t in pair.targets if t.graph == "pp" and t.name == name)
    assert sites == applied == listed


def test_every_name_gemma3(pairs, impl):
    """Gemma 3 (pre- and post-FFN norms, a 262k vocabulary): every name of its graph."""
    pair = pairs("gemma3-q4_k_m")
    failures = []
    for target in (t for t in pair.targets if t.graph == "pp"):
        native, reference, sites, applied = pair.compare([FakeQuantRule(target.name, "bf16")])
        if not (np.array_equal(bits(native), bits(reference)) and sites == applied == target.count):
            failures.append(f"{target.name}: sites {sites}, reference {applied}, listed {target.count}, "
                            f"{int((bits(native) != bits(reference)).sum())} logits differ")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("fmt", ["bf16", "f16", "q8_0"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_formats_and_scales_both_implementations(pairs, impl, fmt, scale):
    pair = pairs("smollm2-f32")
    rules = [FakeQuantRule("ffn_norm", fmt, "0-4,20", scale), FakeQuantRule("result_output", fmt, "-1", scale)]
    native, reference, sites, applied = pair.compare(rules)
    np.testing.assert_array_equal(bits(native), bits(reference))
    assert sites == applied == 7
    assert not np.array_equal(bits(native), bits(pair.baseline))


def test_partial_logits_and_generation(pairs, impl):
    """A batch with logits for only some rows, and one-token decodes (the tg graph)."""
    pair = pairs("smollm2-f32")
    rules = [FakeQuantRule("ffn_norm", "bf16"), FakeQuantRule("result_output", "bf16")]
    native, reference, sites, applied = pair.compare(rules, first=40)
    assert native.shape == (len(pair.tokens) - 40, pair.model.n_vocab)
    np.testing.assert_array_equal(bits(native), bits(reference))
    assert sites == applied == pair.model.n_layer + 1
    pair.native.set_fake_quant(rules)
    pair.hook.set_rules(rules)
    try:
        prompt = pair.tokens[:12]
        assert pair.native.generate(prompt, 16) == pair.ref.generate(prompt, 16)
        assert pair.native.fake_quant_sites == pair.model.n_layer + 1  # the one-token graph has them all
    finally:
        pair.native.set_fake_quant([])
        pair.hook.set_rules([])


def _crafted_f32() -> np.ndarray:
    """Every bf16 value (all 65,536 upper halves) with lower halves 0, 0x7fff, 0x8000 (the tie) and
    0x8001, then the values that decide f16: ±0, ±inf, NaNs with payloads, f32 and f16 subnormals,
    the f16 overflow edge (65504 is the largest f16, 65520 rounds to inf) and their neighbours."""
    upper = np.arange(65536, dtype=np.uint32) << 16
    lows = np.array([0, 0x7FFF, 0x8000, 0x8001], dtype=np.uint32)
    patterns = (upper[:, None] | lows[None, :]).ravel()
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, -65504.0, 65519.996, 65520.0, -65520.0, 65536.0,
                         2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-24, 1e-45, -1e-45, 1e-40],
                        dtype=np.float32).view(np.uint32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC0FFFF, 0x7F812345],
                    dtype=np.uint32)
    return np.concatenate([patterns, specials, nans]).view(np.float32)


class Overwrite:
    """A tensor hook on a native context: writes crafted values into `name` as soon as it is
    computed (so the fake-quant node reads them) and captures `name.fq`, the node's result."""

    def __init__(self, name: str, values: np.ndarray) -> None:
        self.name, self.values, self.result = name, values, None

    def wants(self, name: str) -> bool:
        return name in (self.name, self.name + ".fq")

    def __call__(self, name: str, data: np.ndarray) -> None:
        if name == self.name:
            flat = data.reshape(-1)
            n = min(flat.size, self.values.size)
            flat[:n] = self.values[:n]
            flat[n:] = 0.0
        else:
            self.result = data.reshape(-1)[: self.values.size].copy()


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_crafted_bit_patterns_through_the_node(models, impl, fmt):
    """Every bf16 upper half and the edge cases, through the native node, against harness.rounding:
    equal bits, NaN compared by is-nan and sign (ml_dtypes canonicalizes NaN payloads)."""
    model = models["smollm2-f32"]
    values = _crafted_f32()
    n_tokens = -(-values.size // model.n_embd)  # ffn_norm-3 is [n_tokens, n_embd]
    hook = Overwrite("ffn_norm-3", values)
    ctx = model.context(512, tensor_hook=hook)
    try:
        ctx.set_fake_quant([FakeQuantRule("ffn_norm", fmt, "3")])
        tokens = (model.tokenize(TEXT) * 20)[:n_tokens]
        assert n_tokens <= 512
        ctx.logits(tokens, first=n_tokens - 1)
    finally:
        ctx.close()
    got, want = hook.result, fake_quantize(values, fmt)
    assert got is not None and got.size == values.size
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(want[nan]))
    np.testing.assert_array_equal(bits(got[~nan]), bits(want[~nan]))


def test_impl_override_is_checked(pairs, monkeypatch):
    pair = pairs("smollm2-f32")
    monkeypatch.setenv("LLAMA_FAKE_QUANT_IMPL", "gpu")
    from harness.driver import FakeQuantError

    with pytest.raises(FakeQuantError, match=r"LLAMA_FAKE_QUANT_IMPL='gpu' is not allowed \(allowed: portable, fused\)"):
        pair.native.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
    monkeypatch.delenv("LLAMA_FAKE_QUANT_IMPL")
    assert os.environ.get("LLAMA_FAKE_QUANT_IMPL") is None
    np.testing.assert_array_equal(bits(pair.native.logits(pair.tokens)), bits(pair.baseline))


def test_capture_sees_raw_then_rounded(models):
    """What an eval callback sees: the tensor as computed under its own name, then '<name>.fq'."""
    model = models["smollm2-f32"]
    capture = Capture(r"result_output(\.fq)?")
    ctx = model.context(N_CTX, tensor_hook=capture)
    try:
        ctx.set_fake_quant([FakeQuantRule("result_output", "bf16")])
        logits = ctx.logits(model.tokenize(TEXT)[:N_CTX])
    finally:
        ctx.close()
    raw, rounded = capture.tensors["result_output"], capture.tensors["result_output.fq"]
    np.testing.assert_array_equal(bits(rounded), bits(fake_quantize(raw, "bf16")))
    np.testing.assert_array_equal(bits(logits), bits(rounded))
