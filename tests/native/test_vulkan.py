"""Native fake quantization on a second real backend: Vulkan on Mesa's lavapipe (a CPU Vulkan
driver, as upstream llama.cpp's CI runs it). With layers offloaded the nodes are the portable casts
and copies, placed on the device; the reference rounds the device tensors in the eval callback.

Needs `apt-get install -y libvulkan-dev glslc mesa-vulkan-drivers` (.ci/run installs them). Without
them the tests skip with that message, except under CI=true, where they fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.backend_check import check
from harness.build import build as build_llama_cpp
from harness.cache import HarnessError
from harness.compare import Case
from harness.driver import FakeQuantRule
from harness.models import get_model
from harness.rounding import FORMATS

pytestmark = [pytest.mark.native, pytest.mark.vulkan]

ENV = dict(os.environ, GGML_VK_VISIBLE_DEVICES="0")  # lavapipe is hidden without it
def cases(pairs: list[tuple[str, str]]) -> list[Case]:
    """One rule at every layer per (target, format); SmolLM2 has 30 layers and one result_output."""
    return [Case((FakeQuantRule(t, f),), listed=1 if t == "result_output" else 30) for t, f in pairs]


CASES = cases([(target, fmt) for target in ("ffn_norm", "result_output", "attn_norm") for fmt in ("bf16", "f16")])


@pytest.fixture(scope="module")
def vulkan():
    try:
        vk = build_llama_cpp("vulkan")
    except HarnessError as err:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            raise
        pytest.skip(f"no Vulkan build here: {err}")
    devices = subprocess.run([str(vk.tool("llama-completion")), "--list-devices"], capture_output=True, text=True,
                             env=ENV)
    assert "Vulkan0" in devices.stdout + devices.stderr, f"no Vulkan device (lavapipe):\n{devices.stderr[-2000:]}"
    return vk


@pytest.mark.parametrize("n_gpu_layers", [99, 10])
@pytest.mark.parametrize("model", ["smollm2-f32", "smollm2-q4_1"])
def test_vulkan_native_equals_reference(vulkan, build, tmp_path, model, n_gpu_layers):
    """All layers offloaded, and a partial offload (-ngl 10: the first 20 layers on the CPU, the last
    10 and the output on the device; a context with a GPU backend builds the portable nodes for all):
    bit for bit against the reference, equal counts."""
    baseline, results = check("vulkan", n_gpu_layers, get_model(model, build).path,
                              CASES + cases([("ffn_norm", "q8_0")]), tmp_path, env=ENV)
    assert baseline.bits_equal, f"the eval callback alone changed the logits: {baseline.describe()}"
    for result in results:
        assert result.equal, result.describe()
    # the masking trap on this backend (measured): Vulkan's matmuls take F16 activations, so f16 at
    # a matmul input changes nothing even with F32 weights; the Q4_1 model's logits come out of the
    # device already F16-representable. Everything else changes the logits.
    masked = {("ffn_norm", "f16"), ("attn_norm", "f16")} | ({("result_output", "f16")} if model == "smollm2-q4_1" else set())
    changed = {(r.case.rules[0].target, r.case.rules[0].fmt) for r in results if r.changed}
    assert changed == {(r.case.rules[0].target, r.case.rules[0].fmt) for r in results} - masked


# the formats without a ggml type: a custom node per site that the scheduler runs on the CPU, out of
# place (x copied from the device, y copied back), with a copy over x for the logits (a graph output)
SCALED_CASES = cases([("ffn_norm", f) for f in FORMATS if f not in ("bf16", "f16", "q8_0")] + [
    ("result_output", "nvfp4"), ("result_output", "fp8_e5m2_tensor"), ("attn_norm", "mxint8")])


@pytest.mark.parametrize(("model", "n_gpu_layers"), [("smollm2-f32", 99), ("smollm2-q4_1", 10)])
def test_vulkan_scaled_formats(vulkan, build, tmp_path, model, n_gpu_layers):
    """Every format of FORMATS.md and mxfp4_ggml at ffn_norm, a tensor-scaled format and NVFP4 at the
    logits, MXINT8 at attn_norm: bit for bit against the reference, equal counts, and each changes
    the logits."""
    baseline, results = check("vulkan", n_gpu_layers, get_model(model, build).path, SCALED_CASES, tmp_path, env=ENV)
    assert baseline.bits_equal, f"the eval callback alone changed the logits: {baseline.describe()}"
    for result in results:
        assert result.equal, result.describe()
        assert result.changed, f"{result.case.label} changed nothing"


def test_vulkan_cli_runs_offloaded(vulkan, build):
    """The crash this replaces: llama-completion -ngl 99 with the design's flags; and the custom nodes of mxfp4 and
    nvfp4 (on the CPU, between device nodes)."""
    model = get_model("smollm2-q4_1", build).path
    base = [str(vulkan.tool("llama-completion")), "-m", str(model), "-p", "The capital of France is", "-n", "8",
            "--temp", "0", "-no-cnv", "--no-warmup"]
    for ngl in ("99", "10"):
        for flags in (["--fake-quant-ffn-norm", "bf16", "--fake-quant", "bf16"],
                      ["--fake-quant-ffn-norm", "mxfp4", "--fake-quant", "nvfp4"]):
            out = subprocess.run(base + ["-ngl", ngl, *flags], capture_output=True, text=True, env=ENV, timeout=600)
            assert out.returncode == 0, f"-ngl {ngl} {flags}: exit {out.returncode}\n{out.stderr[-2000:]}"
            assert "The capital of France is" in out.stdout


def test_vulkan_rules_fixed_after_first_decode(vulkan, build):
    """Changing the rules of a live Vulkan context crashed lavapipe intermittently (native/README.md):
    rules set before the first decode work; a later change, adding or clearing, is a clear error."""
    model = get_model("smollm2-q4_1", build).path
    proc = subprocess.run([sys.executable, "-m", "harness.backend_check", "change", "vulkan", "99", str(model)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["before"] == ""
    for step in ("add after", "clear after"):
        assert "cannot change on a context with a GPU backend after it has computed a graph" in outcome[step], step
