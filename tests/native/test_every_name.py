"""A rule's name means the tensors of the computed graph that carry it, for every name the graph
has: native fake quantization (the graph pass in native/fake-quant.patch) against the eval-callback
reference, bit for bit, with the same number of tensors rounded; both implementations of the nodes
(the fused CPU node, and the portable casts and copies that other backends run); crafted bit
patterns through the nodes; partial batches and generation."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from harness.compare import TEXT, Case, bits, compare, first_difference, one_rule_cases
from harness.driver import FakeQuantRule, fake_quant_formats
from harness.reference import Capture
from harness.rounding import FORMATS, fake_quantize

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
# the formats of FORMATS.md and mxfp4_ggml: custom nodes (no ggml type), fused on the CPU path
SCALED_FORMATS = tuple(f for f in FORMATS if f not in ("bf16", "f16", "q8_0"))
ROTATIONS = len(SCALED_FORMATS)
ALL_MODELS = ("smollm2-f32", "smollm2-q4_1", "gemma3-f32", "gemma3-q4_k_m")


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
    listed = next(t.count for t in pair.targets if t.graph == "pp" and t.name == name)
    result = pair.compare(Case((FakeQuantRule(name, "bf16"),), listed=listed))
    assert result.equal, result.describe()


def test_every_name_gemma3(pairs, impl):
    """Gemma 3 (pre- and post-FFN norms, a 262k vocabulary): every name of its graph."""
    pair = pairs("gemma3-q4_k_m")
    results = [pair.compare(case) for case in one_rule_cases([t for t in pair.targets if t.graph == "pp"], ["bf16"])]
    failures = [r.describe() for r in results if not r.equal]
    assert not failures, "\n".join(failures)


def test_native_formats_are_the_references(build):
    """libllama accepts exactly the formats harness.rounding implements, in the same order."""
    assert fake_quant_formats(build) == FORMATS
    assert len(SCALED_FORMATS) == 13


@pytest.mark.parametrize("rotation", range(ROTATIONS))
@pytest.mark.parametrize("model", ALL_MODELS)
def test_every_name_every_format(pairs, monkeypatch, model, rotation):
    """Every (name, format) pair of the computed graph, each model's names all rounded at once: name i
    gets format (i + rotation) mod 13, so the 13 rotations cover every pair once. Compared site by site
    (every rounded tensor, in graph order: an error cannot hide behind a later, coarser rounding) and
    by the logits, against the reference, for the fused and the portable implementation. 16 tokens, the
    last 4 with logits (Gemma's vocabulary is 262k): 13 rotations of 16 tokens cost what 3 of 64 would."""
    pair = pairs(model)
    pp = [t for t in pair.targets if t.graph == "pp"]
    case = Case((FakeQuantRule(t.name, SCALED_FORMATS[(i + rotation) % ROTATIONS]) for i, t in enumerate(pp)),
                n_tokens=16, first=12, record=True, listed=sum(t.count for t in pp))
    reference = pair.run_reference(case)
    assert reference.count == len(reference.sites) == case.listed
    for impl in ("fused", "portable"):
        monkeypatch.setenv("LLAMA_FAKE_QUANT_IMPL", impl)
        native = pair.run_native(case)
        assert native.count == len(native.sites), impl
        result = compare(case, native, reference)
        assert result.equal, f"{impl}: {result.describe()}"


@pytest.mark.parametrize("fmt", ["bf16", "f16", "q8_0"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_formats_and_scales_both_implementations(pairs, impl, fmt, scale):
    pair = pairs("smollm2-f32")
    rules = (FakeQuantRule("ffn_norm", fmt, "0-4,20", scale), FakeQuantRule("result_output", fmt, "-1", scale))
    result = pair.compare(Case(rules, listed=7))
    assert result.equal, result.describe()
    assert result.changed


def test_partial_logits_and_generation(pairs, impl):
    """A batch with logits for only some rows, and one-token decodes (the tg graph)."""
    pair = pairs("smollm2-f32")
    rules = [FakeQuantRule("ffn_norm", "bf16"), FakeQuantRule("result_output", "bf16")]
    case = Case(rules, first=40, listed=pair.model.n_layer + 1)
    native = pair.run_native(case)
    assert native.logits.shape == (len(pair.tokens) - 40, pair.model.n_vocab)
    result = compare(case, native, pair.run_reference(case))
    assert result.equal, result.describe()
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


# Crafted tensors for the scaled formats. Each format's element grid at scale 1 (FORMATS.md §0.3):
# ml_dtypes lists the codes of the float elements; the integer grids are written out.
_INT8_GRID = np.arange(-127, 128, dtype=np.float32)
_ELEMENTS = {
    "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn, "e2m1": ml_dtypes.float4_e2m1fn, "int8": _INT8_GRID, "mxint8": _INT8_GRID / 64,
}
# format -> (element, its scale group: "row", "tensor" or a block length along the row)
CRAFTED = {
    "fp8_e4m3": ("e4m3", "row"), "fp8_e5m2": ("e5m2", "row"), "fp8_e4m3_tensor": ("e4m3", "tensor"),
    "fp8_e5m2_tensor": ("e5m2", "tensor"), "mxfp8_e4m3": ("e4m3", 32), "mxfp8_e5m2": ("e5m2", 32),
    "mxfp6_e2m3": ("e2m3", 32), "mxfp6_e3m2": ("e3m2", 32), "mxfp4": ("e2m1", 32), "mxint8": ("mxint8", 32),
    "nvfp4": ("e2m1", 16), "int8": ("int8", "row"), "mxfp4_ggml": ("e2m1", 32),
}
CRAFTED_ROWS, CRAFTED_NE0 = 48, 576  # ffn_norm-N of SmolLM2 at 48 tokens


def _grid(element: str) -> np.ndarray:
    """The element's non-negative finite values, ascending."""
    codes = _ELEMENTS[element]
    if not isinstance(codes, np.ndarray):
        bits_per_code = 8 if codes in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2) else (6 if "6" in codes.__name__ else 4)
        codes = np.arange(2**bits_per_code, dtype=np.uint8).view(codes).astype(np.float32)
    return np.unique(np.abs(codes[np.isfinite(codes)]))


def _grid_tensor(fmt: str) -> np.ndarray:
    """Every value of the format's element grid, every midpoint between neighbours (the ties) and the
    floats next to each midpoint, both signs, in groups whose scale is exactly 1: each group starts
    with its planted maximum (the element's max; an MX block also takes values above it, up to its
    binade's end, which saturate). NVFP4's tensor holds 2688 = 448·6 in a block of its own (tensor
    scale 1) and 6 in every other block (block scale 1)."""
    element, group = CRAFTED[fmt]
    g = _grid(element)
    top = g[-1]
    mids = (g[:-1] + g[1:]) / 2
    probes = np.concatenate([g, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    if isinstance(group, int) and fmt != "nvfp4":  # above the max, below the next power of two: saturation
        binade_end = np.float32(2.0 ** (np.floor(np.log2(top)) + 1))
        probes = np.concatenate([probes, [top + (top - g[-2]) / 2, np.nextafter(binade_end, np.float32(0)),
                                          (top + binade_end) / 2]])
    probes = np.concatenate([probes, -probes]).astype(np.float32)
    per_group = (CRAFTED_NE0 if not isinstance(group, int) else group) - 1
    planted = np.float32(6.0 if fmt == "nvfp4" else top)
    groups = [np.concatenate([[planted], probes[i:i + per_group]]) for i in range(0, probes.size, per_group)]
    if fmt == "nvfp4":
        groups.insert(0, np.array([2688.0], dtype=np.float32))
    width = CRAFTED_NE0 if not isinstance(group, int) else group
    flat = np.concatenate([np.pad(grp, (0, width - grp.size)) for grp in groups]).astype(np.float32)
    out = np.zeros(CRAFTED_ROWS * CRAFTED_NE0, dtype=np.float32)
    assert flat.size <= out.size, fmt
    out[:flat.size] = flat
    return out.reshape(CRAFTED_ROWS, CRAFTED_NE0)


def _range_tensor(extremes: bool) -> np.ndarray:
    """The same for every format: rows of random values at magnitudes 2^-149 .. 2^127 (FP32 subnormal
    rows included) and one up to FLT_MAX, rows whose maximum is the float just below a power of two (where floorf(log2f())
    is wrong), blocks whose maxima straddle 2^-125 (mxfp4_ggml's pass-through bound), NaN and ±inf
    among finite values (policy P1), rows of only non-finite values and zeros, all-zero and all -0 rows,
    negative values that round to -0; then zero rows. Without `extremes`, only rows whose values stay
    below 2^20, so that a tensor scale is not set by FLT_MAX."""
    rng = np.random.default_rng(20241204)
    rows = []
    exponents = (-149, -140, -133, -127, -126, -125, -100, -60, -20, -8, -1, 0, 3, 8, 19) + ((60, 100, 126, 127) if extremes else ())
    for k in exponents:  # |values| < 2^(k+1), so 2^127's row stays finite
        rows.append(np.float32(rng.uniform(-2, 2, CRAFTED_NE0) * 2.0**k))
    for k in (-125, -20, 3, 8, 19) + ((100, 127) if extremes else ()):
        below = np.nextafter(np.float32(2.0**k), np.float32(0))
        row = np.float32(rng.uniform(-1, 1, CRAFTED_NE0) * 2.0 ** (k - 1))
        row[::37] = below * np.where(np.arange(row[::37].size) % 2, 1, -1).astype(np.float32)
        rows.append(row)
    if extremes:
        rows.append(np.float32(rng.uniform(-1, 1, CRAFTED_NE0)) * np.finfo(np.float32).max)
    blocks = np.float32(rng.uniform(-1, 1, (CRAFTED_NE0 // 32, 32)))  # each block its own maximum near 2^-125
    peaks = np.float32([2.0**-125, np.nextafter(np.float32(2.0**-125), np.float32(0)), 2.0**-126, 2.0**-124, 2.0**-130,
                        1.5 * 2.0**-125] * 3)
    blocks = blocks / np.abs(blocks).max(axis=1, keepdims=True) * peaks[:, None]
    blocks[:, 0] = peaks
    rows.append(np.float32(blocks.ravel()))
    specials = np.float32(rng.standard_normal(CRAFTED_NE0))
    specials[::9], specials[1::11], specials[2::13] = np.nan, np.inf, -np.inf
    rows.append(specials)
    only = np.zeros(CRAFTED_NE0, dtype=np.float32)
    only[::3], only[1::3] = np.inf, -np.nan
    rows.append(only)
    rows.append(np.zeros(CRAFTED_NE0, dtype=np.float32))
    rows.append(np.full(CRAFTED_NE0, -0.0, dtype=np.float32))
    tiny = np.float32(-rng.uniform(0, 1, CRAFTED_NE0) * 2.0**-12)
    tiny[::32] = 1.0
    rows.append(tiny)
    out = np.zeros((CRAFTED_ROWS, CRAFTED_NE0), dtype=np.float32)
    out[:len(rows)] = rows
    return out


class OverwriteMany:
    """A tensor hook on a native context: writes tensors[name] into each named tensor as soon as it is
    computed (its fake-quant node reads them) and captures each node's result as results[name]."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors, self.results = tensors, {}

    def wants(self, name: str) -> bool:
        return name.removesuffix(".fq") in self.tensors

    def __call__(self, name: str, data: np.ndarray) -> None:
        if name in self.tensors:
            assert data.shape == self.tensors[name].shape
            data[...] = self.tensors[name]
        else:
            self.results[name.removesuffix(".fq")] = data.copy()


@pytest.mark.parametrize("fmt", SCALED_FORMATS)
def test_crafted_values_through_the_scaled_formats(models, monkeypatch, fmt):
    """Crafted tensors written into ffn_norm-3, -5 and -7 from the eval callback, rounded by the native
    node: every element value, tie and saturation of the format at scale 1 (layer 3), values from FP32's
    subnormals to its maximum with NaN, ±inf, zeros and -0 (layer 5), the same without the extremes
    (layer 7), against harness.rounding bit for bit (NaN included: P1 keeps them as they are). Fused and
    portable, with 1 and 2 threads (a tensor scale is read before any element is written, whatever the
    threads), and the blend at scale 0.5."""
    model = models["smollm2-q4_1"]  # what the node reads is written by the hook: the fastest model
    tensors = {"ffn_norm-3": _grid_tensor(fmt), "ffn_norm-5": _range_tensor(True), "ffn_norm-7": _range_tensor(False)}
    tokens = (model.tokenize(TEXT) * 4)[:CRAFTED_ROWS]
    for impl, threads, scale in (("fused", 1, 1.0), ("fused", 2, 1.0), ("portable", 1, 1.0), ("portable", 2, 1.0),
                                 ("fused", 2, 0.5)):
        monkeypatch.setenv("LLAMA_FAKE_QUANT_IMPL", impl)
        hook = OverwriteMany(tensors)
        ctx = model.context(CRAFTED_ROWS, threads=threads, tensor_hook=hook)
        try:
            ctx.set_fake_quant([FakeQuantRule("ffn_norm", fmt, "3,5,7", scale)])
            ctx.logits(tokens, first=CRAFTED_ROWS - 1)
        finally:
            ctx.close()
        for name, x in tensors.items():
            differ, first = first_difference(hook.results[name], fake_quantize(x, fmt, scale),
                                             f"{impl}, {threads} threads, scale {scale}, {name}")
            assert not differ, f"{differ} values differ; {first}"


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
