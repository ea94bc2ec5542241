"""The patched tools from the command line: the design's scenarios run as written, every bad
value is a clear error with a nonzero exit, and verbose output names what was fake-quantized."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from harness.bench import logged_buffer_mib
from harness.reference import parse_layers
from harness.rounding import FORMATS
from refusal import refused

pytestmark = pytest.mark.native

PROMPT = "測試提示"  # the design's "test prompt"
SCENARIOS = {
    "baseline": [],
    "all_layers_bf16": ["--fake-quant-ffn-norm", "bf16"],
    "layer10_bf16": ["--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "10"],
    "ffn_norm_and_logits": ["--fake-quant-ffn-norm", "bf16", "--fake-quant", "bf16"],
}


def run(build, tool: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(build.tool(tool)), *args], capture_output=True, text=True, errors="replace",
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def q4_1(build):
    from harness.models import get_model

    return str(get_model("smollm2-q4_1", build).path)


SITES_ENTRY = re.compile(r"(?P<target>[^\s,{}]+?)(?:-\{(?P<layers>[0-9,-]+)\})?(?P<plain> and \S+)? "
                         rf"(?P<fmt>{'|'.join(sorted(FORMATS, key=len, reverse=True))})(?: scale \S+)?(?:, |$)")


def fake_quantized(stderr: str) -> set[str]:
    """The tensors the graph pass fake-quantized, from libllama's -v log (one line per graph, by
    rule: "fake-quantizing 7 tensors: ffn_norm-{0-4,7} bf16, result_output f16")."""
    lines = [line for line in stderr.splitlines() if "llama_fake_quant_rewrite: fake-quantizing" in line]
    found = set()
    for line in lines:
        count, _, entries = line.split("fake-quantizing ", 1)[1].partition(" tensors: ")
        names = []
        for m in SITES_ENTRY.finditer(entries):
            layers = sorted(parse_layers(m["layers"], 10_000)) if m["layers"] else []
            names += [f"{m['target']}-{il}" for il in layers] + ([m["target"]] if m["plain"] or not layers else [])
        assert len(names) == int(count), line
        found.update(names)
    return found


def sites_in_graph(stderr: str) -> int:
    """The site count libllama logs (at -lv 4) after the last rule was added."""
    counts = [int(line.rsplit(": ", 1)[1].split()[0]) for line in stderr.splitlines()
              if "fake_quant_add: fake-quantizing" in line]
    assert counts, "libllama logged no fake-quant rule"
    return counts[-1]


@pytest.fixture(scope="module")
def scenario_baseline(build, q4_1) -> str:
    result = run(build, "llama-completion", "-m", q4_1, "-p", PROMPT, "-n", "50", "--seed", "42", "-no-cnv")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - {"baseline"}))
def test_design_scenarios_run_with_llama_completion(build, q4_1, scenario_baseline, scenario):
    """As written in the design (+ -no-cnv): the flags reach the graph (the site count libllama logs
    is the scenario's) and the seeded 50-token text differs from the baseline's, so a flag that did
    nothing fails here."""
    result = run(build, "llama-completion", "-m", q4_1, "-p", PROMPT, "-n", "50", "--seed", "42",
                 *SCENARIOS[scenario], "-no-cnv", "-lv", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(PROMPT) and result.stdout != scenario_baseline
    expected = {"all_layers_bf16": 30, "layer10_bf16": 1, "ffn_norm_and_logits": 31}[scenario]
    assert sites_in_graph(result.stderr) == expected


def test_design_scenario_runs_with_llama_cli_single_turn(build, q4_1):
    result = run(build, "llama-cli", "-m", q4_1, "-p", PROMPT, "-n", "20", "--seed", "42", "-st", "-lv", "4",
                 *SCENARIOS["layer10_bf16"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sites_in_graph(result.stderr) == 1


def test_fake_quant_changes_the_generated_text_and_scale_zero_does_not(build, q4_1):
    def text(*flags: str) -> str:
        result = run(build, "llama-completion", "-m", q4_1, "-p", "The history of", "-n", "40", "--temp", "0",
                     "-t", "1", "-no-cnv", "-lv", "4", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    base = text()
    assert text("--fake-quant-ffn-norm", "bf16", "--fake-quant-ffn-scale", "0") == base
    assert text("--fake-quant-ffn-norm", "q8_0") != base


def test_verbose_output_names_every_fake_quantized_tensor(build, q4_1):
    result = run(build, "llama-completion", "-m", q4_1, "-p", "hi", "-n", "1", "-v", "-no-cnv",
                 "--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "3,5", "--fake-quant", "f16")
    assert result.returncode == 0
    assert fake_quantized(result.stderr) == {"ffn_norm-3", "ffn_norm-5", "result_output"}


@pytest.mark.parametrize(("tool", "flags", "message"), [
    ("llama-completion", ["--fake-quant-ffn-norm", "bf17"], f"unknown fake-quant format 'bf17' (allowed: {', '.join(FORMATS)})"),
    ("llama-completion", ["--fake-quant-tensor", "attn_norm:mxfp4:0:0.5:x"], "malformed --fake-quant-tensor"),
    ("llama-completion", ["--fake-quant-tensor", "attn_norm:fp8"], "unknown fake-quant format 'fp8' (allowed: bf16, f16"),
    ("llama-completion", ["--fake-quant", "MXFP4"], "unknown fake-quant format 'MXFP4' (allowed: bf16, f16"),
    ("llama-completion", ["--fake-quant", "int4"], "unknown fake-quant format 'int4'"),
    ("llama-completion", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "3-"], "malformed fake-quant layer spec '3-'"),
    ("llama-completion", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "30"], "the model has 30 layers (0-29)"),
    ("llama-completion", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-ffn-scale", "1.5"], "fake-quant scale 1.5 is out of range"),
    ("llama-completion", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-ffn-scale", "nan"], "fake-quant scale nan is out of range"),
    ("llama-completion", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-ffn-scale", "half"], "fake-quant scale 'half' is not a number"),
    ("llama-completion", ["--fake-quant-layer", "3"], "--fake-quant-layer and --fake-quant-ffn-scale need --fake-quant-ffn-norm"),
    ("llama-completion", ["--fake-quant-tensor", "attn_norm"], "malformed --fake-quant-tensor 'attn_norm'"),
    ("llama-completion", ["--fake-quant-tensor", "no_such:bf16"], "fake-quant target 'no_such' matches no computed "
     "F32 activation of this model's graph; names at layer 0: norm, attn_norm, Qcur, Vcur, Kcur, kqv_out"),
    ("llama-completion", ["--fake-quant-tensor", "token_embd.weight:bf16"], "which is a model weight"),
    ("llama-completion", ["--fake-quant-tensor", "cache_v_l3:f16"], "which is persistent state (KV cache"),
    ("llama-completion", ["--fake-quant-tensor", "ffn_out:q8_0:0", "--fake-quant-tensor", "ffn_out:bf16"],
     "fake-quant rules 0 and 1 both select 'ffn_out-0'"),
    ("llama-perplexity", ["--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "99"], "the model has 30 layers"),
    ("llama-cli", ["-st", "--fake-quant-ffn-norm", "bf16", "--fake-quant-layer", "31"], "the model has 30 layers"),
])
def test_bad_flags_fail_clearly(build, q4_1, tool, flags, message):
    inputs = ["-f", "/dev/null"] if tool == "llama-perplexity" else ["-p", "hi", "-n", "1"]
    refused([str(build.tool(tool)), "-m", q4_1, *inputs, *flags], message)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("bf16", "f16", "q8_0")])
def test_scaled_formats_run_with_llama_completion(build, q4_1, fmt):
    """Each format of FORMATS.md and mxfp4_ggml through the flags: --fake-quant-ffn-norm at every layer,
    --fake-quant on the logits and --fake-quant-tensor on attn_norm layers 0-3 at scale 0.5; libllama
    logs the 35 sites (-lv 4) and names each tensor with its format (-v)."""
    result = run(build, "llama-completion", "-m", q4_1, "-p", "The history of", "-n", "4", "--temp", "0", "-no-cnv",
                 "-v", "--fake-quant-ffn-norm", fmt, "--fake-quant", fmt, "--fake-quant-tensor", f"attn_norm:{fmt}:0-3:0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("The history of")
    assert sites_in_graph(result.stderr) == 30 + 1 + 4
    assert fake_quantized(result.stderr) == {f"ffn_norm-{il}" for il in range(30)} | {"result_output"} | {
        f"attn_norm-{il}" for il in range(4)}
    assert {m["fmt"] for line in result.stderr.splitlines() if "llama_fake_quant_rewrite: fake-quantizing" in line
            for m in SITES_ENTRY.finditer(line.split(" tensors: ", 1)[1])} == {fmt}


def test_help_lists_every_format(build):
    """The format flags' help lists libllama's formats (llama_fake_quant_formats), all of them."""
    result = run(build, "llama-completion", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # the help wraps its lines
    for flag in ("--fake-quant-ffn-norm TYPE", "--fake-quant TYPE"):
        help_text = text.split(flag + " ", 1)[1].split(" --", 1)[0]
        assert help_text.endswith(": " + ", ".join(FORMATS)), help_text


def test_generic_tensor_flag_takes_effect(build, q4_1):
    """--fake-quant-tensor reaches the graph at exactly the named tensors and changes the text."""
    def greedy(*flags: str) -> subprocess.CompletedProcess:
        result = run(build, "llama-completion", "-m", q4_1, "-p", "The history of", "-n", "40", "--temp", "0",
                     "-t", "1", "-no-cnv", "-lv", "4", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    base = greedy()
    result = greedy("--fake-quant-tensor", "attn_norm:f16:0-3:0.5", "--fake-quant-tensor", "l_out:bf16")
    assert sites_in_graph(result.stderr) == 4 + 30
    assert result.stdout != base.stdout
    assert "specified multiple times" not in result.stderr  # every rule applies: no "only last value" warning


def test_fake_quant_list_prints_the_targets(build, q4_1):
    result = run(build, "llama-completion", "-m", q4_1, "--fake-quant-list")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "graph\tname\tlayers\tshape\tcount"
    rows = {(graph, name): (layers, shape, count) for graph, name, layers, shape, count in (l.split("\t") for l in lines[1:])}
    assert rows[("pp", "ffn_norm")] == ("0-29", "576x512", "30")
    assert rows[("tg", "ffn_norm")] == ("0-29", "576", "30")
    assert rows[("pp", "result_output")] == ("-", "49152x512", "1")
    assert rows[("pp", "Vcur")][2] == "60"  # the matmul and its reshape both carry the name
    assert not any(name.startswith(("cache_", "inp_tokens", "attn_inp")) or "." in name for _, name in rows)


def harness_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=600)


def test_harness_build_prints_the_bin_directory_last(build):
    result = harness_cli("build")
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1] == str(build.bin_dir)


@pytest.mark.parametrize(("name", "message"), [
    ("/nonexistent/model.gguf", "model file not found: /nonexistent/model.gguf"),
    ("tinyllama", "unknown model 'tinyllama' (allowed: smollm2-q4_1, gemma3-q4_k_m, smollm2-f32, smollm2-f16, gemma3-f32"),
    (__file__.replace(".py", ".gguf"), "model file not found"),
])
def test_harness_model_errors(build, name, message):
    result = harness_cli("model", name)
    assert result.returncode == 1
    assert message in result.stderr


def test_harness_model_rejects_a_file_that_is_not_gguf(build, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    result = harness_cli("model", str(fake))
    assert result.returncode == 1
    assert "is not a GGUF file" in result.stderr


def test_harness_model_prints_a_ready_path(build):
    result = harness_cli("model", "smollm2-f16")
    assert result.returncode == 0
    path = result.stdout.strip().splitlines()[-1]
    assert path.endswith("model.gguf") and open(path, "rb").read(4) == b"GGUF"


@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
def test_fake_quant_adds_no_compute_buffer(build, q4_1, fmt):
    """Each CPU site writes over its tensor, and ggml's allocator still frees that tensor after its
    last reader: the compute buffer is the one without fake quantization. (A site whose view of x
    nothing read kept every x for the whole graph: 133.64 instead of 98.25 MiB here.)"""
    def buffer(*flags: str) -> float:
        result = run(build, "llama-completion", "-m", q4_1, "-p", "hi", "-n", "1", "-no-cnv", "-c", "512", "-v", *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        size = logged_buffer_mib(result.stderr.splitlines())
        assert size is not None, "libllama logged no CPU compute buffer size"
        return size

    assert buffer("--fake-quant-ffn-norm", fmt) == buffer()
