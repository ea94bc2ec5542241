"""The native fake quantization (graph nodes added by native/fake-quant.patch) against the
independent numpy reference (eval callback on an unmodified graph): bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.compare import TEXT, Case, bits
from harness.driver import FakeQuantError, FakeQuantRule
from harness.reference import Capture
from harness.rounding import FORMATS, fake_quantize, representable

pytestmark = pytest.mark.native

N_CTX = 96
# fake-quant selections; layer specs refer to SmolLM2's 30 layers
SELECTIONS = {
    "all": [FakeQuantRule("ffn_norm", "{fmt}")],
    "first5": [FakeQuantRule("ffn_norm", "{fmt}", "0-4")],
    "last5": [FakeQuantRule("ffn_norm", "{fmt}", "25-29")],
    "layer10": [FakeQuantRule("ffn_norm", "{fmt}", "10")],
    "logits": [FakeQuantRule("result_output", "{fmt}")],
    "all_logits": [FakeQuantRule("ffn_norm", "{fmt}"), FakeQuantRule("result_output", "{fmt}")],
    "half_scale": [FakeQuantRule("ffn_norm", "{fmt}", "-1", 0.5)],
    "attn_norm_list": [FakeQuantRule("attn_norm", "{fmt}", "1,3,20-22")],
}


def rules_for(selection: str, fmt: str) -> list[FakeQuantRule]:
    return [FakeQuantRule(r.target, r.fmt.format(fmt=fmt), r.layers, r.scale) for r in SELECTIONS[selection]]


@pytest.mark.parametrize("model", ["smollm2-q4_1", "smollm2-f32"])
@pytest.mark.parametrize("fmt", ["bf16", "f16", "q8_0"])
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
def test_native_equals_reference_bitwise(pairs, model, fmt, selection):
    result = pairs(model).compare(Case(rules_for(selection, fmt)))
    assert result.equal and result.native_sites > 0, result.describe()
    if fmt == "bf16" or model == "smollm2-f32":
        assert result.changed, "fake quantization changed nothing"


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_native_equals_reference_gemma3(pairs, fmt):
    pair = pairs("gemma3-q4_k_m")
    result = pair.compare(Case((FakeQuantRule("ffn_norm", fmt), FakeQuantRule("result_output", fmt)),
                               listed=pair.model.n_layer + 1))
    assert result.equal, result.describe()
    assert result.changed


@pytest.mark.parametrize("model", ["smollm2-q4_1", "smollm2-f32", "gemma3-q4_k_m"])
def test_off_equals_baseline_and_live_changes_take_effect(pairs, model):
    pair = pairs(model)
    ctx = pair.native
    np.testing.assert_array_equal(bits(pair.ref.logits(pair.tokens)), bits(pair.baseline))  # callback, no rules
    ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
    bf16 = ctx.logits(pair.tokens)
    ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16", "0-4")])
    first5 = ctx.logits(pair.tokens)
    ctx.set_fake_quant([])
    cleared = ctx.logits(pair.tokens)
    ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
    again = ctx.logits(pair.tokens)
    ctx.set_fake_quant([])
    assert not np.array_equal(bits(bf16), bits(pair.baseline))
    assert not np.array_equal(bits(first5), bits(bf16))
    np.testing.assert_array_equal(bits(cleared), bits(pair.baseline))
    np.testing.assert_array_equal(bits(again), bits(bf16))


def test_scale_zero_is_baseline_and_applied_count(pairs):
    pair = pairs("smollm2-f32")
    before = pair.native.fake_quant_applied
    np.testing.assert_array_equal(bits(pair.run_native(Case((FakeQuantRule("ffn_norm", "bf16", "-1", 0.0),))).logits),
                                  bits(pair.baseline))
    pair.run_native(Case((FakeQuantRule("ffn_norm", "bf16", "2-4"),)))
    assert pair.native.fake_quant_applied - before == 30 + 3  # one ubatch each: 30 sites, then 3


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_captured_ffn_norm_is_the_rounding_of_the_raw_value(models, fmt):
    model = models["smollm2-f32"]
    capture = Capture(r"ffn_norm-\d+(\.fq)?")
    ctx = model.context(N_CTX, tensor_hook=capture)
    tokens = model.tokenize(TEXT)[:N_CTX]
    try:
        ctx.logits(tokens)
        baseline = dict(capture.tensors)
        capture.tensors.clear()
        ctx.set_fake_quant([FakeQuantRule("ffn_norm", fmt, "3,7")])
        ctx.logits(tokens)
    finally:
        ctx.close()
    got = capture.tensors
    # the eval callback sees ffn_norm-N as computed, then the node "ffn_norm-N.fq" that overwrote it
    assert sorted(n for n in got if n.endswith(".fq")) == ["ffn_norm-3.fq", "ffn_norm-7.fq"]
    for il in (3, 7):
        rounded, raw = got[f"ffn_norm-{il}.fq"], got[f"ffn_norm-{il}"]
        assert representable(rounded, fmt).all()
        np.testing.assert_array_equal(bits(rounded), bits(fake_quantize(raw, fmt)))
        assert not representable(raw, fmt).all(), "the raw value should need rounding"
    for il in (0, 1, 2, 3):  # upstream of the first rounding: bit-identical to the baseline
        np.testing.assert_array_equal(bits(got[f"ffn_norm-{il}"]), bits(baseline[f"ffn_norm-{il}"]))
    for il in (4, 5, 29):  # unselected layers are not rounded
        assert not representable(got[f"ffn_norm-{il}"], fmt).all()


def test_masking_trap_f16_weights(pairs):
    """F16 weights: the matmul rounds activations to F16 itself, so f16 fake quantization of
    ffn_norm changes nothing at all, while bf16 (coarser) does."""
    pair = pairs("smollm2-f16")
    np.testing.assert_array_equal(bits(pair.run_native(Case((FakeQuantRule("ffn_norm", "f16"),))).logits),
                                  bits(pair.baseline))
    assert not np.array_equal(bits(pair.run_native(Case((FakeQuantRule("ffn_norm", "bf16"),))).logits),
                              bits(pair.baseline))


@pytest.mark.parametrize(("model", "logits_finite"), [("gemma3-q4_k_m", True), ("gemma3-f32", False)])
def test_f16_overflow_of_gemma3_residual_stays_finite_only_behind_q8_k(models, model, logits_finite):
    """Why the atlas finds f16 at Gemma 3's `l_out` finite on Q4_K_M (KLD 0.22) but non-finite on
    F32: the residual at the BOS token exceeds f16's 65,504 by layer 9, so rounding gives inf and
    the next RMS norm NaN. An F32 matmul spreads the NaN through attention to every row; a Q4_K
    matmul first quantizes its input row to Q8_K, whose max search skips NaN and whose integer
    conversion turns it into a finite value, so the wrong row stays finite."""
    from harness.corpus import load_corpus

    m = models[model]
    tokens = m.tokenize(load_corpus().text[:4000])[:128]
    capture = Capture(r"l_out-9|attn_norm-10|Kcur-10")
    ctx = m.context(128, tensor_hook=capture)
    ctx.set_fake_quant([FakeQuantRule("l_out", "f16", "9")])
    try:
        logits = ctx.logits(tokens)
    finally:
        ctx.close()
    assert np.abs(capture.tensors["l_out-9"][0]).max() > 65504  # seen before the rounding
    assert np.isnan(capture.tensors["attn_norm-10"][0]).any()
    assert np.isfinite(capture.tensors["Kcur-10"]).all() == logits_finite
    assert np.isfinite(logits).all() == logits_finite


def test_thread_count_does_not_change_bits(models):
    """Logits and batched continuations (serial runs use every core, xdist workers one each)."""
    from harness.corpus import GENERATION_PROMPTS

    model = models["smollm2-q4_1"]
    tokens = model.tokenize(TEXT)[:N_CTX]
    prompts = [model.tokenize(text) for _, _, text in GENERATION_PROMPTS]
    results, continuations = [], []
    for threads in (1, 2):
        ctx = model.context(N_CTX, threads=threads)
        ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
        results.append(ctx.logits(tokens))
        ctx.close()
        ctx = model.context(96, threads=threads, sequences=len(prompts))
        ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
        continuations.append(ctx.generate_many(prompts, 50, [None] * len(prompts)))
        ctx.close()
    np.testing.assert_array_equal(bits(results[0]), bits(results[1]))
    assert continuations[0] == continuations[1]


@pytest.mark.parametrize("model", ["smollm2-q4_1", "smollm2-f32", "gemma3-q4_k_m", "gemma3-f32"])
def test_each_continuation_of_a_batch_depends_only_on_its_own_prompt(models, model):
    """generate_many (the matrix's continuations) decodes the prompts together, each in its own KV
    stream: a continuation is the same whichever prompts share its batch, in whatever order and
    slot, and an ended sequence keeps its slot. Checked on every matrix model, fake quantization on."""
    from harness.corpus import GENERATION_PROMPTS, SEEDED_PROMPT

    m = models[model]
    prompts = [m.tokenize(text) for _, _, text in (*GENERATION_PROMPTS, SEEDED_PROMPT)]
    seeds = [None] * len(GENERATION_PROMPTS) + [42]
    ctx = m.context(128, sequences=len(prompts))
    ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
    try:
        forward = ctx.generate_many(prompts, 50, seeds)
        backward = ctx.generate_many(prompts[::-1], 50, seeds[::-1])[::-1]
        # the first prompt beside copies of another prompt: other neighbours, same batch size
        alone = ctx.generate_many([prompts[0]] + [prompts[1]] * (len(prompts) - 1), 50, [None] * len(prompts))
    finally:
        ctx.close()
    assert forward == backward
    assert alone[0] == forward[0] and all(a == forward[1] for a in alone[1:])
    assert any(len(tokens) < 50 for tokens in forward) or model != "smollm2-q4_1", "no sequence ended early"


def test_generate_many_rejects_more_prompts_than_sequences(models):
    from harness.cache import HarnessError

    m = models["smollm2-q4_1"]
    ctx = m.context(64, sequences=2)
    try:
        with pytest.raises(HarnessError, match="3 prompts and 3 seeds for a context of 2 sequences"):
            ctx.generate_many([[1], [2], [3]], 4, [None] * 3)
        with pytest.raises(HarnessError, match="exceed the context size 64"):
            ctx.generate_many([[1] * 60], 10, [None])
    finally:
        ctx.close()


# the names the llama builder gives each layer's computed F32 activations, in graph order
LAYER_NAMES = "norm, attn_norm, Qcur, Vcur, Kcur, kqv_out, attn_out, ffn_inp, ffn_norm, ffn_gate, ffn_up, ffn_swiglu, ffn_out, l_out"


@pytest.mark.parametrize(("rule", "message"), [
    (FakeQuantRule("ffn_norm", "fp4"), f"unknown fake-quant format 'fp4' (allowed: {', '.join(FORMATS)})"),
    (FakeQuantRule("ffn_norm", "mxfp4 "), "unknown fake-quant format 'mxfp4 '"),
    (FakeQuantRule("ffn_norm", "fp8_e4m3_row"), "unknown fake-quant format 'fp8_e4m3_row'"),
    (FakeQuantRule("ffn_norm", ""), "unknown fake-quant format ''"),
    (FakeQuantRule("ffn_norm", "bf16", "30"), "the model has 30 layers (0-29)"),
    (FakeQuantRule("ffn_norm", "bf16", "0-30"), "layer 30 in spec '0-30' is out of range"),
    (FakeQuantRule("ffn_norm", "bf16", "5-2"), "malformed fake-quant layer spec '5-2'"),
    (FakeQuantRule("ffn_norm", "bf16", "1,,2"), "malformed fake-quant layer spec '1,,2'"),
    (FakeQuantRule("ffn_norm", "bf16", "x"), "malformed fake-quant layer spec 'x'"),
    (FakeQuantRule("ffn_norm", "bf16", "-2"), "malformed fake-quant layer spec '-2'"),
    (FakeQuantRule("ffn_norm", "bf16", ""), "empty fake-quant layer spec"),
    (FakeQuantRule("ffn_norm", "bf16", "-1", 1.5), "fake-quant scale 1.5 is out of range (allowed: 0.0 to 1.0)"),
    (FakeQuantRule("ffn_norm", "bf16", "-1", -0.1), "fake-quant scale -0.1 is out of range"),
    (FakeQuantRule("ffn_norm", "bf16", "-1", math.nan), "fake-quant scale nan is out of range"),
    (FakeQuantRule("no_such_tensor", "bf16"), "fake-quant target 'no_such_tensor' matches no computed F32 activation "
     f"of this model's graph; names at layer 0: {LAYER_NAMES}; names of no layer: embd, norm, result_norm, result_output"),
    (FakeQuantRule("result_output", "bf16", "3"), "fake-quant target 'result_output' matches no computed F32 activation "
     f"of layer 3 in this model's graph; names at layer 3: {LAYER_NAMES}"),
    (FakeQuantRule("ffn_norm-3", "bf16"), "'ffn_norm-3' matches no computed F32 activation"),
    (FakeQuantRule("", "bf16"), "empty fake-quant target"),
    # not activations: a model weight, graph inputs, the KV cache
    (FakeQuantRule("token_embd.weight", "bf16"), "selects 'token_embd.weight', which is a model weight: only computed "
     "F32 activations can be fake-quantized"),
    (FakeQuantRule("inp_tokens", "bf16"), "selects 'inp_tokens', which is a graph input"),
    (FakeQuantRule("attn_inp_kq_mask", "bf16"), "selects 'attn_inp_kq_mask', which is a graph input"),
    (FakeQuantRule("cache_k_l0", "bf16"), "selects 'cache_k_l0', which is persistent state (KV cache or recurrent state)"),
    # one tensor, two rules
    (FakeQuantRule("ffn_norm", "f16", "3"), "fake-quant rules 0 and 1 both select 'ffn_norm-3'"),
])
def test_bad_settings_are_rejected_and_leave_the_context_clean(pairs, rule, message):
    pair = pairs("smollm2-q4_1")
    with pytest.raises(FakeQuantError) as info:
        pair.native.set_fake_quant([FakeQuantRule("ffn_norm", "bf16"), rule])
    assert message in str(info.value)
    assert pair.native.rules == ()
    np.testing.assert_array_equal(bits(pair.native.logits(pair.tokens)), bits(pair.baseline))


def test_rows_that_a_block_format_cannot_take_are_refused(build):
    """No tensor of SmolLM2 or Gemma 3 has rows that are not a multiple of 32; the router logits of a
    test-llama-archs MoE model have rows of 2 (its experts). ggml's block formats (q8_0, mxfp4_ggml)
    refuse them with the tensor's name and shape and the format, through the C API and the CLI (exit 1);
    mxfp4 takes them as one short block (test_archs.py compares such sites with the reference)."""
    from harness.archs import arch_models
    from harness.driver import Model
    from refusal import refused

    path = arch_models(build) / "afmoe-moe.gguf"
    model = Model(path, build)
    ctx = model.context(16, threads=1)
    try:
        shape = next(t.shape for t in ctx.fake_quant_targets() if t.graph == "pp" and t.name == "ffn_moe_logits")
        assert shape[0] % 32 != 0
        for fmt in ("mxfp4_ggml", "q8_0"):
            with pytest.raises(FakeQuantError) as info:
                ctx.set_fake_quant([FakeQuantRule("ffn_moe_logits", fmt)])
            assert str(info.value).startswith(f"fake-quant format {fmt} needs rows (ne0) that are a multiple of 32, "
                                              "and 'ffn_moe_logits-")
            assert f"' has shape {'x'.join(map(str, shape))}: use a format without that requirement" in str(info.value)
        ctx.set_fake_quant([FakeQuantRule("ffn_moe_logits", "mxfp4")])
        ctx.logits([1, 2, 3, 4])
        assert ctx.fake_quant_sites > 0
    finally:
        ctx.close()
        model.close()
    refused([str(build.tool("llama-completion")), "-m", str(path), "-p", "hi", "-n", "1", "-no-cnv",
             "--fake-quant-tensor", "ffn_moe_logits:mxfp4_ggml"],
            "fake-quant format mxfp4_ggml needs rows (ne0) that are a multiple of 32, and 'ffn_moe_logits-")
