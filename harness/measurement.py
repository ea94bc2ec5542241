"""The declared version of the measurement, which keys every cached result instead of the source text.

A cached group record or atlas point is reused while its key matches: the model's sha256, the build's
fingerprint, the corpus's sha256, the settings, and the version declared here. The source code is
not in the key, so moving a function, editing a docstring or splitting a module keeps hours of
cached measurements. What keeps the version honest is a test (tests/unit/test_measurement.py): the
syntax of the measurement code, docstrings and comments left out, is recorded in CONFIRMATIONS; a
change to that code fails the test until someone decides, in the same commit, either
- the numbers may change: bump RESULTS_VERSION (or ATLAS_VERSION for the atlas alone) and add a
  confirmation with the new version, or
- they do not: add a confirmation with the same version and a note saying which re-measured sample
  came out identical (command and count).
`python -m harness measurement` prints the current fingerprints and a confirmation line to paste;
`python -m harness measurement verify [--model M] [--sample N]` (harness.verify) re-measures a sample
of cached groups and atlas points in memory and compares them with the cache, bit for bit.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

HARNESS = Path(__file__).resolve().parent

RESULTS_VERSION = 1  # the matrix's group records and baselines (harness.runner and what it imports)
ATLAS_VERSION = 1    # the atlas points, on top of RESULTS_VERSION (harness.atlas and what it adds)

# the roots of each measurement: a module and everything it imports from the harness package
ROOTS = {"results": "harness.runner", "atlas": "harness.atlas"}
# imported by the measurement, and keyed on their own: not part of its fingerprint
KEYED_ELSEWHERE = {
    "harness.build": "the build's fingerprint (sdist, patch, flags, compiler) is in every key",
    "harness.pins": "pinned downloads are verified by sha256; the model's sha256 is in every key",
    "harness.cache": "where and how entries are stored, not what they hold",
    "harness.measurement": "it declares the version (a confirmation added must not change the fingerprint)",
}


@dataclass(frozen=True)
class Confirmation:
    """A decision recorded with the code it was made on: `fingerprint` of `part` is measured by `version`."""

    part: str          # "results" or "atlas"
    version: int
    fingerprint: str
    note: str


CONFIRMATIONS: tuple[Confirmation, ...] = (
    Confirmation("results", 1, "186fd68c9a05543f",
                 "first declared version: cache keys hashed the source text before"),
    Confirmation("atlas", 1, "2153515921c49c79",
                 "first declared version: cache keys hashed the source text before"),
    Confirmation("results", 1, "f33cdb35b147df4a",
                 "models.model_info's gguf-info entry named by GGUF_INFO_VERSION instead of the module's source hash: "
                 "metadata only, no measured value reads it differently"),
    Confirmation("atlas", 1, "7220dacc68d12eb0",
                 "ModelFacts/ModelAtlas split for harness.atlas_cluster, PointStore.put: 22 points of smollm2-f32 "
                 "(attn_norm, ffn_norm, l_out at layers 0,29 and all; bf16, f16, q8_0; max 2 chunks) measured by "
                 "the code of 2153515921c49c79, by this code on a local Dask cluster of 2 workers, and in-process "
                 "by this code before a change to ModelAtlas.candidates (the advisor's): all 22 records identical, "
                 "timing aside"),
    Confirmation("results", 1, "3db55cbc1ed53d90",
                 "backends (ModelSession.backend, gpu_layers): on the CPU gpu_layers is 0 and adds nothing to the "
                 "key, and the CPU path's measurement code is unchanged"),
    Confirmation("atlas", 1, "07e3b1af79da1c18",
                 "ModelFacts carries the backend for atlas.json's provenance; no measured value changes"),
    Confirmation("results", 1, "787d6408b8da2ece",
                 "harness.formats (the reference's format table and kernels): the measurement never calls the "
                 "reference's rounding; bf16/f16/q8_0 kernels pass tests/unit/test_rounding.py unchanged"),
    Confirmation("atlas", 1, "206b653595ed07e8",
                 "the atlas learns the format table: the points of bf16, f16 and q8_0 and their skip reasons are "
                 "the same (tests/unit/test_atlas.py), new formats add points; the advisor takes any format"),
    Confirmation("results", 1, "2ec20a00b05e5b48",
                 "the driver binds llama_fake_quant_formats (the native format list); the measurement's calls are "
                 "unchanged"),
    Confirmation("atlas", 1, "905f89a886115d7a",
                 "--layers none plans every layer at once only; other plans are unchanged (tests/unit/test_atlas.py)"),
    Confirmation("results", 1, "aad9a9864a5babab",
                 "driver.Model drops an unused attribute (n_gpu_layers); nothing reads it"),
    Confirmation("results", 1, "a141058bbbef6587",
                 "typed records (harness.records: runner builds a GroupRecord, summarize a TokenSummary) and the "
                 "METRICS table: `python -m harness measurement verify --sample 5` re-measured smollm2-f32's groups "
                 "all, layer00, layer10, layer21, scale050 in memory: records and arrays.npz bit-identical to the "
                 "cache (5 of 5, timing aside); the whole cache (1,837 records) reads and writes back identical"),
    Confirmation("atlas", 1, "fcc239a57febcad8",
                 "atlas points built as MeasuredPoint/NonFinitePoint/SkippedPoint and written by to_json: the same "
                 "verify run re-measured 5 points of smollm2-f32 (max chunks 1: attn_norm.bf16.L000, "
                 "attn_norm.int8.all, ffn_norm.bf16.L000, ffn_norm.int8.all, result_output.bf16.all): 5 of 5 "
                 "identical, timing aside"),
    Confirmation("results", 1, "672e97a376a77a24",
                 "ModelSession split: Contexts (its three contexts), BaselineFiles (a baseline's file names, the same "
                 "names), tag/entry_name (the same cache names); matrix.TOKENS_PER_CHUNK: `python -m harness "
                 "measurement verify --sample 5` on smollm2-f32: groups all, layer00, layer10, layer21, scale050 "
                 "bit-identical to the cache (5 of 5, records and arrays, timing aside)"),
    Confirmation("atlas", 1, "0a1c943ddaedcb70",
                 "measure_rules reads the baseline through BaselineFiles, ModelFacts names its store by "
                 "runner.entry_name: the same verify run, 5 points of smollm2-f32 (max chunks 1) identical"),
    Confirmation("results", 1, "9db2b5b54e965a67",
                 "typed analysis records (Verdict, Comparison, DosePoint, SweepTop, Advice in harness.records; "
                 "TokenSummary's n_prompts before the intervals), Group.layer a field left out of the cache key "
                 "(Group.key(): every group's key the same as before), matrix.layer_id/EVERY_LAYER, Metric.title: "
                 "`python -m harness measurement verify --sample 6` on smollm2-f32: groups all, layer00, layer08, "
                 "layer16, layer23, scale050 bit-identical to the cache (6 of 6, records and arrays, timing aside); "
                 "`python -m harness.records` reads and writes back all 1,843 cached records identical"),
    Confirmation("atlas", 1, "d6b991df24c20d63",
                 "advise_atlas returns an Advice built from typed points, EVERY_LAYER for \"-1\": the same verify "
                 "run re-measured 6 points of smollm2-f32 (max chunks 1: attn_norm.bf16.L000, "
                 "attn_norm.fp8_e5m2_tensor.all, attn_norm.mxfp8_e5m2.all, ffn_norm.fp8_e4m3.L000, "
                 "ffn_norm.mxfp4.all, result_output.bf16.all): 6 of 6 identical, timing aside"),
    Confirmation("results", 1, "4f22eab8dc1f6fcc",
                 "driver.Context split along its jobs (LiveContext, eval_callback, FakeQuantSettings, Decoder; the "
                 "same libllama calls in the same order): `python -m harness measurement verify --sample 6` on "
                 "smollm2-f32 re-measured groups all, layer00, layer08, layer16, layer23, scale050 and 6 atlas points "
                 "(max chunks 1) in memory: 12 of 12 identical to the cache (records and arrays, timing aside)"),
    Confirmation("results", 1, "d0015cc467e61d26",
                 "the engine and records branches merged; Held with its lower bound (the advisor's verdict), "
                 "AcrossModels, Additivity/AdditivitySkipped typed, EVERY_LAYER moved to driver.py: `python -m "
                 "harness measurement verify` on the merged code (commit after the engine merge): smollm2-q4_1 "
                 "--sample 4 --max-chunks 4, 8 of 8 identical; gemma3-f32 --sample 2 --max-chunks 4, 4 of 4 identical; "
                 "on this code (commit 3b5d4b4): smollm2-f32 --sample 3, 6 of 6 identical (timing aside)"),
    Confirmation("atlas", 1, "3f79695e448eacb9",
                 "the same verify runs' atlas points identical; `python -m harness atlas --layers none` re-assembled "
                 "atlas.json from the cache (0 points measured): equal to the one measured with commit fcf75b4 apart "
                 "from the date and this run's timing (every additivity entry included)"),
    Confirmation("results", 1, "3fe4753dfe784de9",
                 "layer skipping (harness.residuals; ModelSession.start_layer, the driver's Start): the groups never "
                 "start at a layer. The code of 985c081, on this build (49efb2cca0875f35), cached groups baseline, "
                 "all, layer00, layer15, layer29 of smollm2-f32; `python -m harness measurement verify --model "
                 "smollm2-f32 --sample 40 --max-chunks 1` re-measured all, layer00, layer15, layer29 with this code: "
                 "bit-identical (4 of 4, records and arrays, timing aside)"),
    Confirmation("atlas", 1, "54a8667918b0ccc6",
                 "layer skipping: a point at layer L starts there from the stored residual. The code of 985c081 (the "
                 "whole graph) measured 34 points of smollm2-f32 on this build (attn_norm, ffn_norm, l_out at layers "
                 "0, 1, 14, 29 and all; bf16, nvfp4, q8_0; max 1 chunk); the same verify run re-measured all 34 with "
                 "this code, 19 of them skipping (the 18 at layers 1, 14, 29 and result_output from layer 30): 34 of "
                 "34 identical, timing aside"),
    Confirmation("results", 1, "ca770614072b9fc6",
                 "ModelSession.start_layer asks the build's backend (not the offload) whether to skip: `python -m "
                 "harness measurement verify --model smollm2-f32 --sample 8 --max-chunks 1` against the cache of the "
                 "code of 985c081: groups all, layer00, layer15, layer29 and 8 points (5 of them skipping) identical, "
                 "timing aside"),
    Confirmation("results", 1, "fe67f5cd41520f57",
                 "harness.residuals: the capture hook made with the Residuals object, StartCheck.kind for the sweep; "
                 "`python -m harness measurement verify --model smollm2-f32 --sample 8 --max-chunks 1`: 8 groups and 8 "
                 "points identical to the cache made by the code of 985c081 and ae99e6e, timing aside"),
)


def _module_file(module: str) -> Path | None:
    """The file of a harness module (`harness.x` or `harness.sub.x`), or None outside the package."""
    parts = module.split(".")
    if parts[0] != "harness":
        return None
    base = HARNESS.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.Module) -> list[str]:
    """The harness modules a syntax tree imports (`import harness.x`, `from harness.x import y`,
    `from harness import x`). The package imports absolutely; a relative import is refused so
    that nothing is missed."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"relative import of {node.module!r}: the harness imports absolutely")
            found += [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
    return [m for m in found if _module_file(m) is not None]


def modules(part: str) -> list[str]:
    """Every harness module the measurement `part` depends on, transitively, read from the sources
    (a new module is covered without a list)."""
    seen: set[str] = set()
    todo = [ROOTS[part]]
    while todo:
        name = todo.pop()
        if name in seen or name in KEYED_ELSEWHERE:
            continue
        seen.add(name)
        todo += _imports(ast.parse(_module_file(name).read_text()))
    if part != "results":  # the atlas's own share: what the results' fingerprint does not cover
        seen -= set(modules("results"))
    return sorted(seen)


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def fingerprint(part: str) -> str:
    """sha256 of the syntax trees of modules(part), docstrings and comments left out, in an order
    that does not depend on where each module lives (moving one into a subpackage changes only the
    import lines that name it)."""
    dumps = sorted(ast.dump(_without_docstrings(ast.parse(_module_file(m).read_text())))
                   for m in modules(part))
    digest = hashlib.sha256()
    for dump in dumps:
        digest.update(dump.encode() + b"\0")
    return digest.hexdigest()[:16]


def version(part: str) -> int:
    return {"results": RESULTS_VERSION, "atlas": ATLAS_VERSION}[part]


def latest(part: str) -> Confirmation:
    return [c for c in CONFIRMATIONS if c.part == part][-1]


def unconfirmed() -> list[str]:
    """Why the recorded decisions do not cover the code as it is (empty: they do)."""
    problems = []
    for part in ROOTS:
        last, now = latest(part), fingerprint(part)
        if last.version != version(part):
            problems.append(f"{part}: the version is {version(part)}, the last confirmation is for {last.version}")
        if last.fingerprint != now:
            problems.append(f"{part}: the measurement code changed (fingerprint {now}, confirmed {last.fingerprint})")
    return problems


def confirmation_line(part: str, note: str = "NOTE: bumped, or which re-measured sample was identical") -> str:
    """The line to add to CONFIRMATIONS for the code as it is now."""
    return f'    Confirmation("{part}", {version(part)}, "{fingerprint(part)}",\n                 "{note}"),'
