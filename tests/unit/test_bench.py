"""harness.bench: the paired-ratio statistics, a tiny end-to-end run whose JSON must hold every
configuration with usable numbers, and the instruction counts' flags, parsing and arithmetic (with
a stand-in for callgrind; the one test that runs valgrind skips without it)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from harness import driver
from harness.bench import (CONFIGS, PHASES, CallgrindRun, callgrind_command, callgrind_total, cli_flags,
                           compute_buffer_mib, decode_calls, instruction_configs, main_bench, paired_ratios,
                           per_token, run_bench, run_callgrind, run_instructions, run_skip_bench)
from harness.cache import HarnessError
from harness.driver import FakeQuantRule
from harness.models import get_model


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


@pytest.mark.native
def test_skip_bench_smoke(build, tmp_path):
    out = tmp_path / "s.json"
    result = run_skip_bench(("smollm2-f32",), points=3, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    row = result["models"][0]
    assert row["identical"] and row["sample_points"] == 3 and row["plan_points"] > 3
    assert row["points_per_hour"]["skip"] > 0 and row["points_per_hour"]["whole"] > 0 and row["speedup"] > 0
    assert 0 < row["share_in_llama_decode"]["skip"] <= 1 and 0 < row["share_in_llama_decode"]["whole"] <= 1
    assert row["residuals"]["disk_bytes"] > 0 and not row["refused"]


def test_main_skip_bench_rejects_bad_settings(tmp_path, capsys):
    assert main_bench(["--skip-layers", "--points", "0", "--out", str(tmp_path / "s.json")]) == 1
    assert "--points 0: give at least 1 point per model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_bench(["--skip-layers", "--pp", "64"])
    assert "--pp do not apply to --skip-layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_bench(["--points", "3"])
    assert "--points applies to --skip-layers only" in capsys.readouterr().err


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


# --instructions: what can be checked without valgrind (flags, command, parsing, arithmetic, the table)

def test_instruction_configs_are_the_cli_flags():
    configs = instruction_configs(["mxfp4", "fp8_e4m3_tensor"])
    assert configs == {"off": [], "ffn_norm": ["--fake-quant-ffn-norm", "bf16"],
                       "ffn_norm:mxfp4": ["--fake-quant-ffn-norm", "mxfp4"],
                       "ffn_norm:fp8_e4m3_tensor": ["--fake-quant-ffn-norm", "fp8_e4m3_tensor"]}
    assert cli_flags([FakeQuantRule("ffn_norm", "int8"), FakeQuantRule("result_output", "bf16")]) == [
        "--fake-quant-ffn-norm", "int8", "--fake-quant", "bf16"]
    for rule in (FakeQuantRule("ffn_norm", "bf16", layers="3"), FakeQuantRule("ffn_norm", "bf16", scale=0.5),
                 FakeQuantRule("attn_norm", "bf16")):
        with pytest.raises(HarnessError, match="no llama-completion flag for"):
            cli_flags([rule])
    with pytest.raises(HarnessError, match="unknown format 'fp4'"):
        instruction_configs(["fp4"])


def test_callgrind_command_generates_exactly_n_tokens_at_one_thread(tmp_path):
    cmd = callgrind_command(tmp_path / "llama-completion", tmp_path / "m.gguf", 24,
                            ["--fake-quant-ffn-norm", "nvfp4"], tmp_path / "cg.out")
    assert cmd[:3] == ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp_path / 'cg.out'}"]
    assert cmd[3:6] == [str(tmp_path / "llama-completion"), "-m", str(tmp_path / "m.gguf")]
    flags = " ".join(cmd[6:])
    for part in ("-t 1", "--temp 0", "--ignore-eos", "-no-cnv", "--no-warmup", "-n 24"):
        assert f" {part} " in f" {flags} "
    assert cmd[-2:] == ["--fake-quant-ffn-norm", "nvfp4"]


def test_callgrind_output_parsing():
    out = "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 3502700727\n\nfn=(1)\n"
    assert callgrind_total(out) == 3_502_700_727
    with pytest.raises(HarnessError, match="no 'summary:' line"):
        callgrind_total("events: Ir\n")
    # llama_context::decode named at its definition, then called from two sites by id alone
    calls = ("fn=(7) llama_context::decode(llama_batch_ext const&)\n0 5\nfn=(3) main\ncfn=(7)\ncalls=1 0\n0 9\n"
             "cfn=(8) llama_context::encode(llama_batch_ext const&)\ncalls=4 0\n0 2\nfn=(9) loop\ncfn=(7)\n"
             "calls=11 0\n0 3\n")
    assert decode_calls(calls) == 12
    with pytest.raises(HarnessError, match="no llama_context::decode"):
        decode_calls("fn=(3) main\ncfn=(8) llama_context::encode(llama_batch_ext const&)\ncalls=4 0\n")


def test_per_token_is_the_difference_over_the_decode_runs():
    assert per_token(CallgrindRun(48, 5_000, 48), CallgrindRun(16, 1_800, 16)) == 100.0
    with pytest.raises(HarnessError, match="decoded 31 more tokens, not the 32"):
        per_token(CallgrindRun(48, 5_000, 47), CallgrindRun(16, 1_800, 16))
    with pytest.raises(HarnessError, match="longer first"):
        per_token(CallgrindRun(16, 1_800, 16), CallgrindRun(48, 5_000, 48))


def _fake_runner(extra: dict[str, int], calls: list, drift: int = 0):
    """Instructions = 1000 per token plus `extra[format]` per token; `drift` more per token when a command repeats."""
    def run(tool, model, n, flags):
        seen = calls.count((tuple(flags), n))
        calls.append((tuple(flags), n))
        fmt = flags[-1] if flags else "off"
        return CallgrindRun(n, 7_000 + (1000 + extra[fmt] + drift * seen) * n, n)
    return run


def test_run_instructions_table(tmp_path, capsys):
    calls: list = []
    result = run_instructions(formats=["bf16", "nvfp4", "fp8_e5m2_tensor"], tokens=(5, 2), out=tmp_path / "i.json",
                              runner=_fake_runner({"off": 0, "bf16": 5, "nvfp4": 20, "fp8_e5m2_tensor": 30}, calls))
    assert json.loads((tmp_path / "i.json").read_text()) == json.loads(json.dumps(result))
    # ffn_norm and ffn_norm:bf16 share one command; off's runs are made a second time
    assert sorted(set(calls)) == sorted({((), 5), ((), 2), *((("--fake-quant-ffn-norm", f), n)
                                         for f in ("bf16", "nvfp4", "fp8_e5m2_tensor") for n in (5, 2))})
    assert len(calls) == 8 + 2
    model = result["models"]["smollm2-q4_1"]
    rows = {cfg: (e["instructions_per_token"], e["overhead_pct"], e["meets_target"])
            for cfg, e in model["configs"].items()}
    assert rows == {"off": (1000.0, 0.0, None), "ffn_norm": (1005.0, pytest.approx(0.5), True),
                    "ffn_norm:bf16": (1005.0, pytest.approx(0.5), True),
                    "ffn_norm:nvfp4": (1020.0, pytest.approx(2.0), False),
                    "ffn_norm:fp8_e5m2_tensor": (1030.0, pytest.approx(3.0), None)}
    assert model["repeat"]["config"] == "off" and model["repeat"]["identical"] is True
    assert model["repeat"]["spread_pct"] == 0.0
    assert "off run twice: counts identical, per-token count 0.000 % of off apart" in capsys.readouterr().err


def test_run_instructions_reports_counts_that_do_not_repeat(tmp_path):
    result = run_instructions(tokens=(3, 1), out=tmp_path / "i.json",
                              runner=_fake_runner({"off": 0, "bf16": 1}, [], drift=2))
    repeat = result["models"]["smollm2-q4_1"]["repeat"]
    assert repeat["identical"] is False
    assert repeat["spread_pct"] == pytest.approx(0.2)  # 2 of off's 1000 per token


def test_main_instructions_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_bench(["--instructions", "--threads", "2", "--reps", "3"])
    assert exc.value.code == 2
    assert "--reps, --threads do not apply to --instructions" in capsys.readouterr().err
    assert main_bench(["--instructions", "--tokens", "8", "24", "--out", str(tmp_path / "i.json")]) == 1
    assert "the longer first, both >= 1: got [8, 24]" in capsys.readouterr().err
    assert main_bench(["--instructions", "--jobs", "0", "--out", str(tmp_path / "i.json")]) == 1
    assert "jobs must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.native
def test_callgrind_sees_the_format_above_the_run_to_run_spread(build):
    """The premise of --instructions: every token is decoded, and a format's cost stands out of the
    difference between two runs of one command (counts need not repeat exactly: docs/performance.md)."""
    if not shutil.which("valgrind"):
        pytest.skip("valgrind is not installed (Debian: apt-get install valgrind): the instruction counts need it")
    tool, model = build.tool("llama-completion"), get_model("smollm2-q4_1", build).path
    off, again = (run_callgrind(tool, model, 2, []) for _ in range(2))
    mxfp4 = run_callgrind(tool, model, 2, ["--fake-quant-ffn-norm", "mxfp4"])
    assert off.decode_calls == again.decode_calls == mxfp4.decode_calls == 2
    assert mxfp4.instructions - max(off.instructions, again.instructions) > abs(off.instructions - again.instructions)
