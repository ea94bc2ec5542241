"""Native fake quantization against the reference on another backend (Vulkan, CUDA).

libllama is bound once per process and a backend's build is a different library, so each side runs
in a process of its own: one process computes the native run of every case (fake-quant nodes in
the graph), another the reference's (the eval callback rounds the device tensors through
ggml_backend_tensor_get/_set), each with a fresh context per case (harness.compare.Sides); the caller
compares the saved runs with harness.compare.compare.

    python -m harness.backend_check native|reference BACKEND N_GPU_LAYERS MODEL.gguf CASES_JSON OUT_DIR
    python -m harness.backend_check change|renew BACKEND N_GPU_LAYERS MODEL.gguf
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from harness.compare import TEXT, Case, Comparison, Run, compare

N_CTX = 64


def _sides(backend: str, n_gpu_layers: int, model_path: Path, fresh: bool = False):
    """harness.compare.Sides on the model with TEXT's first N_CTX tokens, on the backend's build."""
    from harness.build import build
    from harness.compare import Sides
    from harness.driver import Model

    model = Model(model_path, build(backend), n_gpu_layers=n_gpu_layers)
    return Sides(model, model.tokenize(TEXT)[:N_CTX], N_CTX, fresh=fresh)


def run_side(side: str, backend: str, n_gpu_layers: int, model_path: Path, cases: list[Case], out: Path) -> None:
    """In this process: the baseline and every case's logits (out/<side>-<i>.npy), counts and refusals
    in out/<side>.json; a fresh context per case (see native/README.md, Vulkan)."""
    sides = _sides(backend, n_gpu_layers, model_path, fresh=True)
    run_of = sides.run_native if side == "native" else sides.run_reference
    runs = []
    try:
        for i, case in enumerate([Case(()), *cases]):
            run = run_of(case)
            np.save(out / f"{side}-{'baseline' if i == 0 else i - 1}.npy", run.logits)
            runs.append({"count": run.count, "error": run.error})
    finally:
        sides.close()
        sides.model.close()
    (out / f"{side}.json").write_text(json.dumps(runs[1:]))


def _runs(out: Path, side: str) -> tuple[Run, list[Run]]:
    """A side's saved baseline and case runs."""
    counts = json.loads((out / f"{side}.json").read_text())
    return (Run(np.load(out / f"{side}-baseline.npy"), 0),
            [Run(np.load(out / f"{side}-{i}.npy"), c["count"], error=c["error"]) for i, c in enumerate(counts)])


def change_after_decode(backend: str, n_gpu_layers: int, model_path: Path) -> dict[str, str]:
    """In this process: rules set before a context's first decode, then a change after it, on the live
    context (libllama refuses it on a context with a GPU backend: native/README.md, Vulkan; the driver's
    renewal is turned off here). The messages, "" where accepted."""
    from harness.driver import FakeQuantError, FakeQuantRule

    sides = _sides(backend, n_gpu_layers, model_path)
    outcome = {}
    try:
        ctx = sides.native
        for step, rules in (("before", [FakeQuantRule("ffn_norm", "bf16")]),
                            ("add after", [FakeQuantRule("attn_norm", "bf16")]), ("clear after", [])):
            try:
                ctx.set_fake_quant(rules, renew=False)
                outcome[step] = ""
            except FakeQuantError as err:
                outcome[step] = str(err)
            ctx.logits(sides.tokens)
    finally:
        sides.close()
        sides.model.close()
    return outcome


RENEW_CASES = ([("ffn_norm", "bf16")], [("attn_norm", "bf16"), ("result_output", "f16")], [])


def renew_against_fresh(backend: str, n_gpu_layers: int, model_path: Path) -> dict:
    """In this process: one context switched between rule sets after decodes (on a GPU backend the
    driver renews it each time) against a fresh context per rule set, logits bit for bit (compared
    as the two sides of harness.compare: the live context's run as native, the fresh one's as
    reference)."""
    from harness.compare import Sides
    from harness.driver import FakeQuantRule

    live = _sides(backend, n_gpu_layers, model_path)
    fresh = Sides(live.model, live.tokens, N_CTX, fresh=True)
    cases = []
    try:
        ctx = live.native
        baseline = ctx.logits(live.tokens)
        for rules in RENEW_CASES:
            case = Case(tuple(FakeQuantRule(t, f) for t, f in rules))
            ctx.set_fake_quant(case.rules)
            result = compare(case, Run(ctx.logits(live.tokens), ctx.fake_quant_sites), fresh.run_native(case), baseline)
            cases.append({"rules": rules, "differ": result.differ, "changed": result.changed})
        renewed = ctx.renewed
    finally:
        live.close()
        live.model.close()
    return {"gpu": live.model.gpu, "renewed": renewed, "cases": cases}


def check(backend: str, n_gpu_layers: int, model_path: Path, cases: list[Case], out: Path,
          env: dict[str, str] | None = None, timeout: float = 900) -> tuple[Comparison, list[Comparison]]:
    """Both sides, each in a child process; (the baselines compared, each case compared with
    `changed` against the native baseline). A crash is an error with its exit status and the log's tail."""
    for side in ("native", "reference"):
        proc = subprocess.run([sys.executable, "-m", "harness.backend_check", side, backend, str(n_gpu_layers),
                               str(model_path), json.dumps([[asdict(r) for r in c.rules] for c in cases]), str(out)],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} side exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    (native_baseline, native), (reference_baseline, reference) = _runs(out, "native"), _runs(out, "reference")
    return (compare(Case(()), native_baseline, reference_baseline),
            [compare(case, n, r, native_baseline.logits) for case, n, r in zip(cases, native, reference, strict=True)])


if __name__ == "__main__":
    if sys.argv[1] in ("change", "renew"):
        check_of = change_after_decode if sys.argv[1] == "change" else renew_against_fresh
        print(json.dumps(check_of(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
        sys.exit(0)
    from harness.driver import FakeQuantRule

    run_side(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]),
             [Case(tuple(FakeQuantRule(**r) for r in rules)) for rules in json.loads(sys.argv[5])], Path(sys.argv[6]))
