"""The pass that starts a graph at a layer (llama_fake_quant_start_at), on small graphs shaped like a
builder's (start_at_graph.cpp): exactly the nodes the output needs are kept, with the cache writes the
kept layers read, including a cache a kept layer shares with a layer below (then that layer's write and
what it needs are kept: exact, less is skipped) and a per-layer input computed from the embedding; the residual becomes a graph input; leaves that only
dropped nodes read are reported; sites below the start, or computed before it, are refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.build import Build
from native_program import compile_program

pytestmark = pytest.mark.native

SOURCE = Path(__file__).with_name("start_at_graph.cpp")
OWN_LAYER1 = ["l_out-0", "kcur-1", "cache_k_l1 (view)", "write-1", "read-1", "attn-1", "l_out-1", "result_output"]


@pytest.fixture(scope="module")
def cases(build: Build, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    exe = compile_program(SOURCE, build, tmp_path_factory.mktemp("start_at_graph"))
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return {c["case"]: c for c in map(json.loads, ran.stdout.splitlines())}


def kept_and_dropped(case: dict, kept: list[str]) -> None:
    assert case["error"] == ""
    assert case["kept"] == kept, case["kept"]
    assert case["skipped"] == case["nodes_before"] - len(kept) > 0
    assert case["input_is_input"], "the residual is a graph input: no op, no sources, the input flag"


def test_a_layer_with_its_own_cache(cases):
    case = cases["own"]
    kept_and_dropped(case, OWN_LAYER1)
    assert case["input"] == "l_out-0"
    assert case["orphans"] == ["inp", "cache_k_l0"]  # read only by layer 0 and the embedding: given a backend


def test_a_cache_shared_with_a_layer_below_keeps_that_layers_write(cases):
    kept_and_dropped(cases["shared"], ["embd", "kcur-0", "cache_k_l0 (view)", "write-0", "l_out-0", "read-1",
                                       "attn-1", "l_out-1", "result_output"])
    assert cases["shared"]["orphans"] == ["cache_k_l1"]


def test_a_leaf_only_a_dropped_layer_reads_is_an_orphan(cases):
    kept_and_dropped(cases["layer0_leaf"], OWN_LAYER1)
    assert cases["layer0_leaf"]["orphans"] == ["inp", "bias-0", "cache_k_l0"]


def test_a_per_layer_input_is_computed_from_the_embedding(cases):
    kept_and_dropped(cases["per_layer_input"], ["embd", "l_out-0", "kcur-1", "cache_k_l1 (view)", "write-1",
                                                "read-1", "attn-1", "per_layer-1", "attn_pl-1", "l_out-1",
                                                "result_output"])


def test_after_the_last_layer_only_the_output_is_computed(cases):
    kept_and_dropped(cases["after_last"], ["l_out-1", "result_output"])
    assert cases["after_last"]["orphans"] == ["inp", "cache_k_l0", "cache_k_l1"]


def test_a_site_at_the_start_layer_or_kept_is_taken(cases):
    kept_and_dropped(cases["site_at_start"], OWN_LAYER1)
    assert cases["site_before_kept"]["error"] == ""  # embd is computed: layer 0's shared-cache write needs it


@pytest.mark.parametrize(("case", "error"), [
    ("site_below", "a fake-quant rule selects 'kcur-0', below layer 1: the graph can start at layer 1 only if every "
                   "rule is at that layer or above"),
    ("site_before", "a fake-quant rule selects 'embd', which is computed before 'l_out-0': the graph can start at "
                    "layer 1 only if every rule is computed after it"),
    ("no_residual", "the graph has no 'l_out-2' (the residual stream entering layer 3): this architecture's graph "
                    "cannot start at layer 3"),
])
def test_refusals_leave_the_graph_as_it_was(cases, case, error):
    assert cases[case]["error"] == error
    assert len(cases[case]["kept"]) == cases[case]["nodes_before"] and cases[case]["skipped"] == 0
