"""Every backend this machine has, through the Python driver: a model loads, computes, and its
fake-quant rules change (a GPU context is renewed); on CUDA, fake quantization is exact on every
architecture (docs/gpu.md).

Which backends run: the CPU always; Vulkan where its build and Mesa's lavapipe are (as
test_vulkan.py: skipped without them, failed under CI=true); CUDA where nvcc with cuBLAS and an
NVIDIA GPU are. Tests marked `cuda` skip with the reason without them, and always under CI=true
(CI has no GPU). Each check runs in a process of its own (libllama is bound once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import build as build_mod
from harness.archs import arch_models, check_all
from harness.cache import HarnessError

pytestmark = pytest.mark.native

MODEL = "llama-dense.gguf"  # test-llama-archs's llama: 2 layers, every name of a llama graph
VULKAN_ENV = {"GGML_VK_VISIBLE_DEVICES": "0"}  # lavapipe is hidden without it


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def backend_build(backend: str):
    """The backend's build, or a skip naming what is missing (a failure for Vulkan under CI=true)."""
    if backend == "cpu":
        return build_mod.build()
    if backend == "cuda":
        if in_ci():
            pytest.skip("CI=true: CI has no GPU, so the CUDA tests do not run there (docs/gpu.md: the GPU check)")
        found, how = build_mod._cuda_device_query()
        if not found and not os.environ.get(build_mod.CUDA_ARCH_ENV):
            pytest.skip(f"no NVIDIA GPU here ({how})")
    try:
        return build_mod.build(backend)
    except HarnessError as err:
        if backend == "vulkan" and in_ci():
            raise
        pytest.skip(f"no {backend} build here: {err}")


def run(module_args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", *module_args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative one is a signal):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


BACKENDS = [pytest.param("cpu", 0, id="cpu"), pytest.param("vulkan", build_mod.ALL_LAYERS, id="vulkan-all"),
            pytest.param("vulkan", 1, id="vulkan-partial"),
            pytest.param("cuda", build_mod.ALL_LAYERS, id="cuda-all", marks=pytest.mark.cuda),
            pytest.param("cuda", 1, id="cuda-partial", marks=pytest.mark.cuda)]


@pytest.mark.parametrize(("backend", "gpu_layers"), BACKENDS)
def test_the_driver_loads_computes_and_renews(backend, gpu_layers):
    """What crashed on CUDA (issue 22): a model loaded through harness.driver. Then one context switched
    between rule sets after decodes against a fresh context per set, bit for bit; on a GPU backend the
    driver renews the context for each change (libllama refuses a change on the live one)."""
    b = backend_build(backend)
    model = arch_models(b) / MODEL
    env = VULKAN_ENV if backend == "vulkan" else {}
    renewal = run(["harness.backend_check", "renew", backend, str(gpu_layers), str(model)], env)
    assert renewal["gpu"] == (backend != "cpu")
    assert renewal["renewed"] == (3 if backend != "cpu" else 0)
    for case in renewal["cases"]:
        assert case["differ"] == 0, case
        assert case["changed"] == bool(case["rules"]), case  # each rule set changes the logits; none restores them
    change = run(["harness.backend_check", "change", backend, str(gpu_layers), str(model)], env)
    assert change["before"] == ""
    for step in ("add after", "clear after"):  # the live context: accepted on the CPU, refused clearly on a GPU
        if backend == "cpu":
            assert change[step] == ""
        else:
            assert "cannot change on a context with a GPU backend after it has computed a graph" in change[step]


@pytest.mark.cuda
@pytest.mark.parametrize("gpu_layers", [build_mod.ALL_LAYERS, 1], ids=["all", "partial"])
def test_cuda_every_architecture_native_equals_reference(gpu_layers):
    """Item 3 of issue 22: every name of every test-llama-archs model, native == reference bit for bit,
    equal counts, with every layer and with one layer offloaded."""
    b = backend_build("cuda")
    results = check_all(b, workers=os.cpu_count() or 2, gpu_layers=gpu_layers)
    exceptions = {r.model: r.status if r.status != "mismatch" else r.mismatches for r in results if r.status != "ok"}
    assert not exceptions, exceptions


# bf16 (casts on the device) and formats without a ggml type (custom nodes that only the CPU computes)
VULKAN_SWEEP_FORMATS = ("bf16", "mxfp4", "nvfp4", "fp8_e4m3")


@pytest.mark.vulkan
@pytest.mark.parametrize("gpu_layers", [build_mod.ALL_LAYERS, 1], ids=["all", "partial"])
def test_vulkan_architectures_native_equals_reference(monkeypatch, gpu_layers):
    """The same sweep on lavapipe for three architectures (dense, with pre- and post-norms, MoE), all
    layers and one layer offloaded: the GPU path of the sweep, where a context is renewed per name. In the
    custom-node formats a later site of the same name (Qcur, Kcur, Vcur: a view of the first site's result)
    is written over in CPU memory, which the write must run beside (it crashed on the device before:
    native/README.md, "Writes over x")."""
    b = backend_build("vulkan")
    for name, value in VULKAN_ENV.items():  # the child processes inherit it
        monkeypatch.setenv(name, value)
    results = check_all(b, gpu_layers=gpu_layers, only=("llama-dense", "gemma3-dense", "qwen3moe-moe"),
                        formats=VULKAN_SWEEP_FORMATS)
    assert len(results) == 3
    assert all(r.status == "ok" for r in results), [(r.model, r.status, r.mismatches) for r in results]
