"""Build and cache plumbing that needs no compiler run: patch errors, atomic publication,
build keys, layer specs of the reference."""

from __future__ import annotations

import pytest

from harness import build as build_mod
from harness.cache import HarnessError, publish
from harness.models import check_gguf
from harness.reference import parse_layers


def test_patch_that_does_not_apply_names_the_file(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(HarnessError) as info:
        build_mod.apply_patch(tmp_path)
    message = str(info.value)
    assert "fake-quant.patch does not apply" in message
    assert "src/llama-graph.cpp" in message or "common/arg.cpp" in message


def test_publish_is_all_or_nothing(tmp_path):
    final = tmp_path / "entry"

    def fail(tmp):
        (tmp / "half-written").write_text("x")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        publish(final, fail)
    assert not final.exists() and list(tmp_path.iterdir()) == [tmp_path / "entry.lock"]
    publish(final, lambda tmp: (tmp / "done").write_text("ok"))
    assert (final / "done").read_text() == "ok"
    publish(final, lambda tmp: pytest.fail("a published entry is never made again"))


@pytest.fixture
def cuda_arch(monkeypatch):
    """set(value): $FQ_CUDA_ARCHITECTURES for the next fingerprint (the detected value is cached per process)."""
    def set_arch(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(build_mod.CUDA_ARCH_ENV, raising=False)
        else:
            monkeypatch.setenv(build_mod.CUDA_ARCH_ENV, value)
        build_mod.cuda_architectures.cache_clear()

    yield set_arch
    build_mod.cuda_architectures.cache_clear()


def test_build_key_covers_patch_and_flags(monkeypatch, tmp_path, cuda_arch):
    base = build_mod.fingerprint()
    assert build_mod.fingerprint()["key"] == base["key"]
    cuda_arch("90-real")
    assert build_mod.fingerprint("cuda")["key"] != base["key"] != build_mod.fingerprint("vulkan")["key"]
    patch = tmp_path / "other.patch"
    patch.write_text(build_mod.PATCH.read_text() + "\n")
    monkeypatch.setattr(build_mod, "PATCH", patch)
    assert build_mod.fingerprint()["key"] != base["key"]


def test_cpu_features_are_pinned():
    flags = build_mod.CMAKE_FLAGS
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX512=OFF" in flags and "-DGGML_AVX2=ON" in flags


def test_check_gguf(tmp_path):
    with pytest.raises(HarnessError, match="model file not found"):
        check_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML")
    with pytest.raises(HarnessError, match="is not a GGUF file"):
        check_gguf(bad)


@pytest.mark.parametrize(("spec", "layers"), [("-1", None), ("3", {3}), ("0-4", {0, 1, 2, 3, 4}),
                                              ("1,3,20-22", {1, 3, 20, 21, 22})])
def test_reference_layer_specs(spec, layers):
    assert parse_layers(spec, 30) == (None if layers is None else frozenset(layers))


@pytest.mark.parametrize("spec", ["30", "5-2", "x", "1,,2"])
def test_reference_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        parse_layers(spec, 30)


def test_cuda_architectures_name_the_build(cuda_arch, monkeypatch):
    """The architectures are flags, so they are in the key; $FQ_CUDA_ARCHITECTURES takes CMake's lists."""
    cuda_arch("90-real")
    h200 = build_mod.fingerprint("cuda")
    assert "-DCMAKE_CUDA_ARCHITECTURES=90-real" in h200["flags"].split()
    cuda_arch("86, 89-real;120a-real")
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89-real;120a-real" in build_mod.fingerprint("cuda")["flags"].split()
    assert build_mod.fingerprint("cuda")["key"] != h200["key"]
    for bad in ("sm_90", "90-fast", "native"):
        cuda_arch(bad)
        with pytest.raises(HarnessError, match=f"FQ_CUDA_ARCHITECTURES=.*'{bad}' is not a CUDA architecture"):
            build_mod.fingerprint("cuda")
    # the CPU and Vulkan keys never depend on it
    assert build_mod.fingerprint("vulkan")["key"] == build_mod.fingerprint("vulkan")["key"]


def test_cuda_architectures_default_to_the_gpus_of_the_build_machine(cuda_arch, monkeypatch):
    cuda_arch(None)
    monkeypatch.setattr(build_mod, "_cuda_device_query", lambda: ([90, 90], "/usr/local/cuda/bin/__nvcc_device_query"))
    assert build_mod.cuda_architectures() == ("90-real", "detected on this machine by __nvcc_device_query")
    cuda_arch(None)
    monkeypatch.setattr(build_mod, "_cuda_device_query", lambda: ([], "nvidia-smi: exit 9 no devices"))
    with pytest.raises(HarnessError, match="no CUDA GPU detected on this machine .*nvidia-smi: exit 9.* set "
                                           "FQ_CUDA_ARCHITECTURES, e.g. 90-real"):
        build_mod.fingerprint("cuda")


@pytest.mark.parametrize(("env", "args", "expected"), [
    ({}, (None, None), ("cpu", 0)),
    ({}, ("vulkan", None), ("vulkan", build_mod.ALL_LAYERS)),
    ({}, ("cuda", 10), ("cuda", 10)),
    ({"FQ_BACKEND": "cuda"}, (None, None), ("cuda", build_mod.ALL_LAYERS)),
    ({"FQ_BACKEND": "cuda", "FQ_GPU_LAYERS": "0"}, (None, None), ("cuda", 0)),
    ({"FQ_BACKEND": "cuda", "FQ_GPU_LAYERS": "7"}, ("vulkan", 3), ("vulkan", 3)),  # arguments win
])
def test_offload_choice(monkeypatch, env, args, expected):
    for name in ("FQ_BACKEND", "FQ_GPU_LAYERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert build_mod.offload(*args) == expected


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"FQ_BACKEND": "metal"}, (None, None), r"unknown backend \$FQ_BACKEND='metal' \(allowed: cpu, vulkan, cuda\)"),
    ({}, ("rocm", None), r"unknown backend 'rocm'"),
    ({"FQ_BACKEND": "cuda", "FQ_GPU_LAYERS": "all"}, (None, None), r"\$FQ_GPU_LAYERS='all' is not a layer count"),
    ({}, ("cuda", -1), r"gpu layers -1 is negative"),
    ({}, ("cpu", 5), r"gpu layers 5 needs a GPU backend \(vulkan or cuda\)"),
])
def test_offload_errors(monkeypatch, env, args, message):
    for name in ("FQ_BACKEND", "FQ_GPU_LAYERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HarnessError, match=message):
        build_mod.offload(*args)


def test_cuda_build_names_what_it_lacks(monkeypatch, tmp_path):
    """No nvcc, or an nvcc without cuBLAS (a pip-installed compiler): an error naming the package."""
    monkeypatch.setattr(build_mod.shutil, "which", lambda name: None)
    with pytest.raises(HarnessError, match="building the cuda backend needs nvidia-cuda-toolkit"):
        build_mod._check_backend("cuda")
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    (tmp_path / "cuda" / "include").mkdir()
    monkeypatch.setattr(build_mod.shutil, "which", lambda name: str(nvcc) if name == "nvcc" else None)
    monkeypatch.setattr(build_mod, "CUDA_ROOTS", (str(tmp_path / "elsewhere"),))
    for name in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HarnessError, match=f"needs cuBLAS: no cublas_v2.h in .*{tmp_path / 'cuda' / 'include'}"):
        build_mod._check_backend("cuda")
    (tmp_path / "cuda" / "include" / "cublas_v2.h").write_text("")
    build_mod._check_backend("cuda")
