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


def test_build_key_covers_patch_and_flags(monkeypatch, tmp_path):
    base = build_mod.fingerprint()
    assert build_mod.fingerprint()["key"] == base["key"]
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
