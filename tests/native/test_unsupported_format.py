"""The portable implementation's "a device cannot compute this cast" error, run for real.

No backend on the test machines lacks a cast, so `llama_fake_quant_rewrite`'s error for a fake-quant
node the site's device does not support never runs through llama_context. Its device verdict is a
parameter (`unsupported`), so unsupported_format.cpp calls the exported function of the cached
libllama on a tiny ggml graph with a stub device ("StubGPU") and prints one JSON line per case;
these tests check the message word for word, the sites and the rewiring of the graph's readers.

What a refused rewrite leaves in the graph is not a contract: llama_context returns failure and
discards that graph (native/README.md), so it is not tested here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.build import Build
from native_program import compile_program

pytestmark = pytest.mark.native

SOURCE = Path(__file__).with_name("unsupported_format.cpp")
DEVICE = "StubGPU"
CASES = ("q8_0_refused", "bf16_accepted", "f16_accepted", "q8_0_accepted", "q8_0_fused_not_asked",
         "bf16_fused_not_asked", "bf16_refused", "bf16_blend_dequant_refused", "bf16_blend_sub_refused",
         "q8_0_second_layer_refused", "mxfp4_portable_not_asked", "nvfp4_portable_not_asked", "nvfp4_fused",
         "mxfp4_output_copy_refused", "mxfp4_output_copy_accepted", "mxfp4_nested_view", "bf16_nested_view",
         "q8_0_rows_not_multiple", "mxfp4_ggml_rows_not_multiple", "mxfp4_rows_not_multiple")
# the single-site graph: x = scale(inp) named ffn_norm-0, read twice by out-0 = add(x, x)
REWIRED_READS = "ffn_norm-0.fq, ffn_norm-0.fq"


def expected_error(fmt: str, name: str, op: str, src: str, dst: str) -> str:
    """The message of llama-fake-quant.cpp's unsupported-node error; `op` as ggml_op_desc gives it."""
    return (f"fake-quant format {fmt} of '{name}' needs {op} {src} -> {dst}, which {DEVICE} does not support "
            "(use bf16 or f16, or keep that layer on the CPU)")


@pytest.fixture(scope="module")
def program(build: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """unsupported_format.cpp, compiled and linked to the cached build's libllama."""
    return compile_program(SOURCE, build, tmp_path_factory.mktemp("unsupported_format"))


@pytest.fixture(scope="module")
def ran(program: Path) -> subprocess.CompletedProcess:
    """The program's run; its exit status is checked by a test, not here."""
    return subprocess.run([str(program)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          check=False)


@pytest.fixture(scope="module")
def cases(ran: subprocess.CompletedProcess) -> dict[str, dict]:
    """case name -> what the program observed (one JSON line each)."""
    return {c["case"]: c for c in map(json.loads, ran.stdout.splitlines())}


def test_program_exits_normally(ran: subprocess.CompletedProcess, cases: dict[str, dict]) -> None:
    """An error is a returned message: no abort, no crash, and every case ran to its line."""
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert tuple(cases) == CASES


@pytest.mark.parametrize("case, fmt, name, op, src, dst", [
    ("q8_0_refused", "q8_0", "ffn_norm-0", "CPY", "f32", "q8_0"),  # (a) the cast to q8_0
    ("bf16_refused", "bf16", "ffn_norm-0", "CPY", "f32", "bf16"),  # (e) the cast to bf16
    ("bf16_blend_dequant_refused", "bf16", "ffn_norm-0", "CPY", "bf16", "f32"),  # scale < 1: the cast back
    ("bf16_blend_sub_refused", "bf16", "ffn_norm-0", "SUB", "f32", "f32"),  # scale < 1: the blend's sub
    ("q8_0_second_layer_refused", "q8_0", "ffn_norm-1", "CPY", "f32", "q8_0"),  # only layer 1's device
    ("mxfp4_output_copy_refused", "mxfp4", "ffn_norm-0", "CPY", "f32", "f32"),  # the copy over a graph output
])
def test_unsupported_node_is_the_error(cases: dict[str, dict], case: str, fmt: str, name: str, op: str, src: str,
                                       dst: str) -> None:
    """The message names the format, the tensor, the first refused node's op and types, and the device."""
    c = cases[case]
    assert c["error"] == expected_error(fmt, name, op, src, dst)
    il = int(name.rsplit("-", 1)[1])
    # the stub saw that node (ggml_op_desc, src[0] type -> type, the site's layer), and was asked nothing after it
    assert c["refused"] == [f"{op} {src} -> {dst} il={il}"]
    assert c["asked"][-1] == c["refused"][0]


@pytest.mark.parametrize("case, fmt", [("bf16_accepted", "bf16"), ("f16_accepted", "f16"),
                                       ("q8_0_accepted", "q8_0")])
def test_supported_casts_are_built(cases: dict[str, dict], case: str, fmt: str) -> None:
    """(b) the q8_0-refusing device has the bf16 and f16 casts; (c) a device with every cast takes q8_0:
    one site, both casts asked about at layer 0, the reader rewired to y, y placed right after x."""
    c = cases[case]
    assert c["error"] == ""
    assert c["sites"] == [[0, 0]]
    assert c["asked"] == [f"CPY f32 -> {fmt} il=0", f"CPY {fmt} -> f32 il=0"]
    assert c["refused"] == []
    assert c["rewired"] == [True] and c["over_x"] == [False]
    assert c["reads"] == [REWIRED_READS]
    assert c["order"] == ["ffn_norm-0 SCALE", "ffn_norm-0.fq.q CPY", "ffn_norm-0.fq CPY", "out-0 ADD"]


@pytest.mark.parametrize("case, nodes", [
    ("q8_0_fused_not_asked", ["ffn_norm-0.fq.q CPY", "ffn_norm-0.fq CPY"]),  # no fused q8_0 node: the casts
    ("bf16_fused_not_asked", ["ffn_norm-0.fq MAP_CUSTOM1"]),  # the one fused node
])
def test_fused_impl_does_not_ask(cases: dict[str, dict], case: str, nodes: list[str]) -> None:
    """(d) LLAMA_FAKE_QUANT_IMPL_CPU_FUSED never consults `unsupported` (only the portable branch does):
    llama_context picks it when every backend is a CPU, which has every cast. Even the q8_0 casts it
    builds (there is no fused q8_0 node) are not checked, so a refusing device changes nothing.
    The fused path writes the result over x right after x; the first reader's first slot is pointed at
    the result (so ggml's allocator releases that view, and x, after it) and its second still reads x."""
    c = cases[case]
    assert c["asked"] == []
    assert c["error"] == ""
    assert c["sites"] == [[0, 0]]
    assert c["rewired"] == [True] and c["over_x"] == [True]
    assert c["reads"] == ["ffn_norm-0.fq, ffn_norm-0"]
    assert c["order"] == ["ffn_norm-0 SCALE", *nodes, "out-0 ADD"]


@pytest.mark.parametrize(("case", "nodes", "over_x"), [
    ("mxfp4_portable_not_asked", ["ffn_norm-0.fq CUSTOM"], False),
    ("nvfp4_portable_not_asked", ["ffn_norm-0.fq.amax CUSTOM", "ffn_norm-0.fq CUSTOM"], False),
    ("nvfp4_fused", ["ffn_norm-0.fq.amax CUSTOM", "ffn_norm-0.fq CUSTOM"], True),
    ("mxfp4_output_copy_accepted", ["ffn_norm-0.fq.q CUSTOM", "ffn_norm-0.fq CPY"], True),
])
def test_formats_without_a_ggml_type_are_custom_nodes(cases: dict[str, dict], case: str, nodes: list[str],
                                                      over_x: bool) -> None:
    """(f) a format ggml has no type for is a custom node, which only the CPU computes: the device is not
    asked about it (a device that refuses everything takes it), and the scheduler places it on the CPU.
    Portable: out of place, every reader rewired; where x is a graph output the result is copied over
    x, and that copy is the one node the device is asked about. nvfp4 first computes the row maxima
    of the whole tensor (its tensor scale) in a node of its own, on both paths."""
    c = cases[case]
    assert c["error"] == ""
    assert c["sites"] == [[0, 0]]
    assert c["asked"] == (["CPY f32 -> f32 il=0"] if case == "mxfp4_output_copy_accepted" else [])
    assert c["over_x"] == [over_x] and c["rewired"] == [True]
    assert c["reads"] == ["ffn_norm-0.fq, ffn_norm-0" if c["impl"] == "cpu_fused" else REWIRED_READS]
    assert c["order"] == ["ffn_norm-0 SCALE", *nodes, "out-0 ADD"]
    # only a portable write over x is reported (the copy over the graph output, whose memory x owns)
    assert c["writes"] == (["CPY over ffn_norm-0 SCALE"] if case == "mxfp4_output_copy_accepted" else [])


@pytest.mark.parametrize(("case", "first", "second", "owner"), [
    ("mxfp4_nested_view", ["ffn_norm-0.fq CUSTOM"], ["ffn_norm-0.fq.q CUSTOM", "ffn_norm-0.fq CPY"], "CUSTOM"),
    ("bf16_nested_view", ["ffn_norm-0.fq.q CPY", "ffn_norm-0.fq CPY"], ["ffn_norm-0.fq.q CPY", "ffn_norm-0.fq CPY"],
     "CPY"),
])
def test_a_site_that_is_a_view_of_another_reports_its_write(cases: dict[str, dict], case: str, first: list[str],
                                                             second: list[str], owner: str) -> None:
    """Two sites of one name, the second a view of the first (as Vcur after its reshape): the first is
    rounded out of place and the view made a view of its result, so the second is copied over memory that
    the first site's last node owns. That write is reported with its owner: for a custom node (CPU memory)
    llama_context places the copy on the CPU; on a GPU backend it crashed when the scheduler put it on
    the device (native/README.md, "Writes over x"). The reader reads the second site's result."""
    c = cases[case]
    assert c["error"] == ""
    assert c["sites"] == [[0, 0], [0, 0]]
    assert c["order"] == ["ffn_norm-0 SCALE", *first, "ffn_norm-0 RESHAPE", *second, "out-0 ADD"]
    assert c["writes"] == [f"CPY over ffn_norm-0.fq {owner}"]
    assert c["reads"] == [REWIRED_READS]


@pytest.mark.parametrize("case, fmt", [("q8_0_rows_not_multiple", "q8_0"), ("mxfp4_ggml_rows_not_multiple", "mxfp4_ggml")])
def test_rows_that_a_block_format_cannot_take(cases: dict[str, dict], case: str, fmt: str) -> None:
    """(g) ggml's block formats need rows of whole blocks: a tensor with 100-value rows is refused with
    its name, shape and the format, and nothing is added; mxfp4 takes it (a shorter last block)."""
    c = cases[case]
    assert c["error"] == (f"fake-quant format {fmt} needs rows (ne0) that are a multiple of 32, and 'ffn_norm-0' "
                          "has shape 100x2: use a format without that requirement (only q8_0 and mxfp4_ggml have it)")
    assert c["n_nodes_after"] == c["n_nodes_before"]
    ok = cases["mxfp4_rows_not_multiple"]
    assert ok["error"] == "" and ok["order"] == ["ffn_norm-0 SCALE", "ffn_norm-0.fq CUSTOM", "out-0 ADD"]
