"""harness.bench: the paired-ratio statistics, and a tiny end-to-end run whose JSON must hold
every configuration with usable numbers."""

from __future__ import annotations

import json
import math

import pytest

from harness import driver
from harness.bench import CONFIGS, PHASES, compute_buffer_mib, main_bench, paired_ratios, run_bench
from harness.cache import HarnessError


def test_paired_ratios_pair_by_round():
    # round 2 is slow for both: pairing cancels it, unpaired medians (3.0 / 2.0) would not
    stats = paired_ratios([1.1, 6.6, 2.2], [1.0, 6.0, 2.0])
    assert stats["median"] == pytest.approx(1.1)
    assert stats["min"] == pytest.approx(1.1) and stats["max"] == pytest.approx(1.1)
    assert stats["overhead_pct"] == pytest.approx(10.0)
    spread = paired_ratios([1.0, 3.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0])
    assert (spread["median"], spread["min"], spread["max"]) == (2.5, 1.0, 5.0)
    assert spread["overhead_pct"] == pytest.approx(150.0)
    with pytest.raises(ValueError):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratios([], [])


@pytest.mark.native
def test_bench_smoke(build, tmp_path, capsys):
    out = tmp_path / "b.json"
    result = run_bench(("smollm2-q4_1",), pp_tokens=32, tg_tokens=4, repetitions=1, threads=1, out=out,
                       formats=("mxfp4", "fp8_e4m3_tensor"))
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["build"]["cold_s"] > 0 and data["build"]["warm_s"] > 0
    assert data["machine"]["build_key"] == build.fingerprint["key"]
    configs = data["models"]["smollm2-q4_1"]["configs"]
    assert set(configs) == set(CONFIGS) | {"ffn_norm:mxfp4", "ffn_norm:fp8_e4m3_tensor"}
    assert configs["ffn_norm:mxfp4"]["pp"]["meets_target"] is not None  # a block format has the 1 % target
    assert configs["ffn_norm:fp8_e4m3_tensor"]["pp"]["meets_target"] is None  # a per-tensor scale has none
    for name, entry in configs.items():
        assert (entry["applied"] > 0) == (name != "off")
        for phase in PHASES:
            e = entry[phase]
            assert e["tokens_per_s"] > 0 and e["median_s"] > 0 and e["median_compute_s"] > 0
            assert len(e["samples"]) == 1
            for ratio in (e["ratio"], e["compute_ratio"]):
                assert all(math.isfinite(ratio[k]) and ratio[k] > 0 for k in ("median", "min", "max"))
            if name == "off":
                assert e["ratio"]["median"] == 1.0
        mem = entry["memory"]
        assert mem["compute_buffer_mib"] > 0 and mem["max_rss_kib"] > 0
        assert mem["compute_buffer_ratio"] > 0 and mem["rss_ratio"] > 0
    assert "target" in capsys.readouterr().err


def test_main_bench_rejects_bad_settings(tmp_path, capsys):
    assert main_bench(["--pp", "-1", "--out", str(tmp_path / "b.json")]) == 1
    assert "at least 1" in capsys.readouterr().err
    assert main_bench(["--formats", "fp4", "--out", str(tmp_path / "b.json")]) == 1
    assert "unknown format 'fp4' (allowed: bf16, f16, q8_0," in capsys.readouterr().err


def test_compute_buffer_is_the_backends_own(monkeypatch):
    """With layers offloaded libllama logs one compute buffer per buffer type; the bench reports the
    device's (the last one logged: a re-reserve logs again), and says so when no device took the layers."""
    lines = ["llama_context:    Vulkan0 compute buffer size =    9.00 MiB\n",
             "llama_context:        CPU compute buffer size =    1.00 MiB\n",
             "llama_context:    Vulkan0 compute buffer size =   12.50 MiB\n",
             "llama_context: Vulkan_Host compute buffer size =    2.00 MiB\n",
             "llama_context:        CPU compute buffer size =    3.25 MiB\n"]
    monkeypatch.setattr(driver, "_log_lines", lines)
    assert compute_buffer_mib("vulkan") == 12.5
    assert compute_buffer_mib("cpu") == 3.25
    with pytest.raises(HarnessError, match="no 'CUDA0 compute buffer size' line"):
        compute_buffer_mib("cuda")
    monkeypatch.setattr(driver, "_log_lines", lines[1:2])
    with pytest.raises(HarnessError, match="GGML_VK_VISIBLE_DEVICES=0"):
        compute_buffer_mib("vulkan")


def test_main_bench_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        main_bench(["--backend", "metal"])
    assert exc.value.code == 2
    assert "invalid choice: 'metal'" in capsys.readouterr().err
