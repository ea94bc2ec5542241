"""Every architecture: llama.cpp's own test-llama-archs writes a tiny random-weight model of each
architecture it supports; for each, every name of its computed graph is fake-quantized natively
and by the eval-callback reference, and the logits bits and the counts are compared.

Each model runs in its own process (a crash in one architecture's graph must not take the others
with it), two at a time. `python -m harness archs` prints the table; `--readme` also rewrites the
generated section of native/README.md. `--backend vulkan|cuda [--gpu-layers N]` runs the same on a
GPU build with N layers offloaded (default: all); there each rule set gets a fresh context (the
rules of a GPU context are fixed after its first decode; harness.driver renews it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.build import Build
from harness.cache import HarnessError, cache_root, progress, publish

SEED = 42
N_TOKENS = 16
# bf16 (ggml's cast) and a block, a block-plus-tensor and a row-scaled format (custom nodes): every name
# of every architecture in each; MoE graphs have rows of 1 or 2 values (router weights), which the
# block formats take as one short block
FORMATS = ("bf16", "mxfp4", "nvfp4", "fp8_e4m3")
START_KINDS = (("every", "models bit-identical at every layer"), ("some", "at some layers (refused at the others)"),
               ("none", "refused at every layer"), ("differs", "differ"))
README = Path(__file__).resolve().parent.parent / "native" / "README.md"
BEGIN, END = "<!-- archs:begin (python -m harness archs --readme) -->", "<!-- archs:end -->"


@dataclass
class ArchResult:
    """One architecture's model: the names of its graph and what native vs reference gave."""

    model: str                                   # file name: <arch>-dense.gguf / <arch>-moe.gguf
    status: str                                  # "ok", "mismatch", or why it could not run here
    names: list[str] = field(default_factory=list)
    ffn_norm_sites: int = 0
    mismatches: list[str] = field(default_factory=list)  # "name: what differs"
    start: str = ""                              # starting the graph at each layer (harness.residuals.check_start)
    start_kind: str = ""                         # StartCheck.kind


def arch_models(build: Build) -> Path:
    """The generated models, made once per build (the writer is part of the build)."""
    final = cache_root() / "arch-models" / f"{build.fingerprint['key']}-s{SEED}"

    def make(tmp: Path) -> None:
        progress(f"writing a tiny model of every architecture (test-llama-archs -s {SEED})")
        result = subprocess.run([str(build.tool("test-llama-archs")), "-o", str(tmp), "-s", str(SEED)],
                                capture_output=True, text=True)
        if result.returncode != 0 or not list(tmp.glob("*.gguf")):
            raise HarnessError(f"test-llama-archs failed ({result.returncode}):\n{result.stderr[-2000:]}")

    return publish(final, make)


def check_model(path: Path, build: Build, gpu_layers: int = 0, formats: Sequence[str] = FORMATS) -> ArchResult:
    """In this process: every pp-graph name in every format of `formats` at all its tensors, native vs
    reference (harness.compare)."""
    from harness.compare import Case, Sides, one_rule_cases
    from harness.driver import FakeQuantError, FakeQuantRule, Model
    from harness.residuals import check_start

    result = ArchResult(path.name, "ok")
    try:
        model = Model(path, build, n_gpu_layers=gpu_layers)
    except HarnessError as err:
        result.status = "cannot load: " + str(err).splitlines()[-1].strip()
        return result
    sides = Sides(model, [(7 * i + 1) % model.n_vocab for i in range(N_TOKENS)], threads=1)
    try:
        if not sides.compare(Case(())).bits_equal:
            result.status = "baseline differs with an eval callback (the graph is not deterministic here)"
            return result
        progress("baseline ok")
        targets = [t for t in sides.targets if t.graph == "pp"]
        result.names = sorted(t.name for t in targets)
        if "ffn_norm" not in result.names:  # the error must name what the graph has instead
            try:
                sides.native.set_fake_quant([FakeQuantRule("ffn_norm", "bf16")])
                result.mismatches.append("ffn_norm: accepted although the listing has no ffn_norm")
            except FakeQuantError as err:
                at_layer0 = {t.name for t in targets if 0 in t.layers}
                if "names at layer 0: " not in str(err) or not all(n in str(err) for n in at_layer0):
                    result.mismatches.append(f"ffn_norm: the error does not list the names of layer 0: {err}")
        for case in one_rule_cases(targets, formats):
            progress(f"target {case.label}")
            comparison = sides.compare(case)
            if case.rules[0].target == "ffn_norm":
                result.ffn_norm_sites = comparison.native_sites
            if not comparison.equal:
                result.mismatches.append(comparison.describe())
        if gpu_layers == 0:  # refused with a GPU backend
            progress("target start at each layer")
            start = check_start(model, sides.tokens, threads=1)
            result.start = start.text()
            result.start_kind = start.kind
            if start.differs:
                result.mismatches.append(f"start at a layer: {result.start}")
        if result.mismatches:
            result.status = "mismatch"
    finally:
        sides.close()
        model.close()
    return result


def _check_in_subprocess(path: Path, backend: str = "cpu", gpu_layers: int = 0, timeout: float = 600,
                         formats: Sequence[str] = FORMATS) -> ArchResult:
    env = dict(os.environ, FQ_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "harness.archs", str(path), backend, str(gpu_layers),
                               ",".join(formats)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ArchResult(path.name, f"cannot run: no result within {timeout:.0f} s")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        reason = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"exit {proc.returncode}: {lines[-1]}"
        steps = [line.removeprefix("[harness] target ") for line in lines if line.startswith("[harness] target ")]
        if any(line == "[harness] baseline ok" for line in lines):  # it ran: fake quantization broke it
            return ArchResult(path.name, "mismatch", mismatches=[f"{steps[-1] if steps else 'listing'}: {reason}"])
        return ArchResult(path.name, "cannot run: " + reason)
    return ArchResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def model_paths(build: Build, only: Sequence[str] = ()) -> list[Path]:
    """The generated models in name order (or those whose file names start with one of `only`)."""
    return [p for p in sorted(arch_models(build).glob("*.gguf")) if not only or p.name.startswith(tuple(only))]


def check_all(build: Build, workers: int = 2, gpu_layers: int = 0, only: Sequence[str] = (),
              formats: Sequence[str] = FORMATS) -> list[ArchResult]:
    """model_paths(build, only), `workers` processes at a time, in `formats`."""
    paths = model_paths(build, only)
    results: list[ArchResult] = []
    with ThreadPoolExecutor(workers) as pool:
        for i, result in enumerate(pool.map(lambda p: _check_in_subprocess(p, build.backend, gpu_layers,
                                                                           formats=formats), paths), 1):
            results.append(result)
            progress(f"architectures {i}/{len(paths)}: {result.model} {result.status}")
    return results


def table(results: list[ArchResult], where: str = "") -> str:
    """Markdown: model → names of its graph, ffn_norm sites, bitwise result (`where`: the backend, if not the CPU)."""
    ok = sum(r.status == "ok" for r in results)
    lines = [f"{ok} of {len(results)} models: every name bit-identical to the reference with equal counts, in "
             f"each of {', '.join(FORMATS)}. Models written by `test-llama-archs -s {SEED}`, {N_TOKENS} tokens, "
             f"one format at every tensor of one name at a time{where}.", "",
             "The last column starts the graph at each layer L from the residual entering it "
             "(`llama_fake_quant_start_at`, no rule) and compares the logits with the whole graph's: "
             + ", ".join(f"{sum(r.start_kind == kind for r in results)} {text}" for kind, text in START_KINDS)
             + ".", "",
             "| model | names in the computed graph | `ffn_norm` sites | native == reference | start at layer L |",
             "|---|---|---|---|---|"]
    for r in results:
        verdict = {"ok": f"bit-identical ({len(r.names)} names × {len(FORMATS)} formats)",
                   "mismatch": "**differs**: " + "; ".join(r.mismatches)}.get(r.status, r.status)
        sites = str(r.ffn_norm_sites) if "ffn_norm" in r.names else "no `ffn_norm`"
        lines.append(f"| {r.model.removesuffix('.gguf')} | {', '.join(r.names) or '–'} | {sites} | {verdict} | "
                     f"{r.start or '–'} |")
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> None:
    doc = README.read_text()
    if BEGIN not in doc or END not in doc:
        raise HarnessError(f"{README} has no generated section ({BEGIN} … {END})")
    head, rest = doc.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


if __name__ == "__main__":  # one model, in a child process of check_all: PATH [BACKEND GPU_LAYERS [FORMATS]]
    from harness.build import build as _build

    backend, layers = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 3 else ("cpu", 0)
    chosen = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else FORMATS
    print(json.dumps(asdict(check_model(Path(sys.argv[1]), _build(backend), layers, chosen))))
