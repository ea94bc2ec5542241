"""The ctypes mirrors against the C structs they mirror (harness.abi): the layouts the compiler gives
the patched headers, field by field, for every struct llama-cpp-python's bindings mirror and the
one harness.driver mirrors itself.

This is the CPU-side check for the CUDA crash of issue 22 (a segfault in llama_model_load_from_file
from Python only): a mirror whose fields a CPU load never reads (devices, split_mode, main_gpu,
tensor_split, ...) could be wrong unnoticed on the CPU. The layouts agree (so that is not the cause;
docs/gpu.md, "The CUDA crash"); the tests below also show that the check catches such a mirror.
"""

from __future__ import annotations

import ctypes

import pytest

from harness import abi

pytestmark = pytest.mark.native

# differences the pinned bindings have, each with why it cannot affect the harness
KNOWN = {
    ("llama_opt_params", "optimizer_type"): "llama-cpp-python 0.3.36 omits this field of the training API's "
                                            "parameters; the harness never calls llama_opt_*",
    ("llama_opt_params", "*"): "the same missing field (the mirror is 8 bytes short)",
}
PASSED_BY_VALUE = ("llama_model_params", "llama_context_params", "llama_batch", "llama_sampler_chain_params")


@pytest.fixture(scope="module")
def checked(build):
    return abi.check(build)


def test_every_mirror_matches_its_struct(checked):
    compared, differences = checked
    names = {c.split(" ")[0] for c in compared}
    assert set(PASSED_BY_VALUE) | {"_TensorHead"} <= names
    assert {(d.struct, d.field) for d in differences} == set(KNOWN), [f"{d.struct}.{d.field}: {d.what}"
                                                                      for d in differences]


@pytest.fixture(scope="module")
def model_params(build):
    """The C layout and members of struct llama_model_params (the one llama_model_load_from_file takes)."""
    headers = abi.headers()
    members = abi.struct_members((headers / "include" / "llama.h").read_text(), "llama_model_params")
    layout = abi.c_layouts({"llama_model_params": members}, [headers / d for d in ("include", "ggml/include")])
    return members, layout["llama_model_params"]


def _mirror(fields):
    return type("llama_model_params", (ctypes.Structure,), {"_fields_": fields})


BINDINGS = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p), ("n_gpu_layers", ctypes.c_int32),
            ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int), ("lazy_mode", ctypes.c_int),
            ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p), ("progress_callback", ctypes.c_void_p),
            ("progress_callback_user_data", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p),
            ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool), ("use_extra_bufts", ctypes.c_bool),
            ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool), ("load_mtp", ctypes.c_bool)]


def test_a_faithful_copy_passes(model_params):
    members, layout = model_params
    assert abi.compare(_mirror(BINDINGS), members, layout) == []


def test_an_older_layout_is_caught(model_params):
    """The layout of bindings written before load_mode/lazy_mode (use_mmap, use_mlock bools instead):
    main_gpu and everything after it shift, and the booleans do not exist in C."""
    members, layout = model_params
    old = [f for f in BINDINGS if f[0] not in ("load_mode", "lazy_mode")]
    old.insert(old.index(("vocab_only", ctypes.c_bool)) + 1, ("use_mmap", ctypes.c_bool))
    old.insert(old.index(("use_mmap", ctypes.c_bool)) + 1, ("use_mlock", ctypes.c_bool))
    found = {(d.field, d.what.split(" ")[0]) for d in abi.compare(_mirror(old), members, layout)}
    assert {("main_gpu", "offset/size"), ("tensor_split", "offset/size"), ("use_mmap", "in"),
            ("load_mode", "in"), ("lazy_mode", "in")} <= found


def test_swapped_gpu_fields_are_caught(model_params):
    """Two int fields only a GPU load reads, swapped: same size, so only the offsets tell."""
    members, layout = model_params
    swapped = list(BINDINGS)
    i, j = swapped.index(("split_mode", ctypes.c_int)), swapped.index(("main_gpu", ctypes.c_int32))
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert {d.field for d in abi.compare(_mirror(swapped), members, layout)} == {"split_mode", "main_gpu"}


def test_struct_members_reads_declarations():
    header = """
    struct other { int a; };
    // struct s { int commented; };
    struct s {
        int a, b[4];             /* two */
        const char * (*name)(const struct s * x, int y);
        union {
            long long i;
            char str[16];
        };
        struct { int x; } named;
        bool flag; // last
    };
    """
    members = abi.struct_members(header, "s")
    assert [(m.name, m.union) for m in members] == [("a", None), ("b", None), ("name", None), ("i", 0), ("str", 0),
                                                    ("named", None), ("flag", None)]
    assert abi.struct_members(header, "absent") is None
