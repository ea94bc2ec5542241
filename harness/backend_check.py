"""Native fake quantization against the reference on another backend (Vulkan, CUDA).

libllama is bound once per process and a backend's build is a different library, so each side runs
in a process of its own: one process computes the native logits of every case (fake-quant nodes in
the graph), another the reference's (the eval callback rounds the device tensors through
ggml_backend_tensor_get/_set), each with a single context; the caller compares the saved logits.

    python -m harness.backend_check native|reference BACKEND N_GPU_LAYERS MODEL.gguf CASES_JSON OUT_DIR
    python -m harness.backend_check change|renew BACKEND N_GPU_LAYERS MODEL.gguf
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; "
        "the third introduced special relativity. 17 + 25 = 42, and 6 * 7 = 42 as well.")
N_CTX = 64


@dataclass
class CaseResult:
    target: str
    fmt: str
    differ: int           # logits whose bits differ between native and reference (-1: refused)
    sites: int            # native fake-quant sites
    applied: int          # tensors the reference rounded
    changed: bool         # the native logits differ from the baseline
    error: str = ""       # libllama's message when the setting was refused


def run_side(side: str, backend: str, n_gpu_layers: int, model_path: Path, cases: list[tuple[str, str]],
             out: Path) -> None:
    """In this process: the baseline and every case's logits (out/<i>.npy), counts in out/<side>.json."""
    from harness.build import build
    from harness.driver import FakeQuantError, FakeQuantRule, Model
    from harness.reference import ReferenceFakeQuant

    model = Model(model_path, build(backend), n_gpu_layers=n_gpu_layers)
    tokens = model.tokenize(TEXT)[:N_CTX]
    counts: list[dict] = []
    try:
        for i, case in enumerate([None, *cases]):  # a fresh context per case: see native/README.md, Vulkan
            hook = ReferenceFakeQuant([], model.n_layer) if side == "reference" else None
            ctx = model.context(N_CTX, tensor_hook=hook)
            try:
                if case is not None:
                    rules = [FakeQuantRule(case[0], case[1])]
                    try:
                        if hook is None:
                            ctx.set_fake_quant(rules)
                        else:
                            hook.set_rules(rules)
                    except FakeQuantError as err:
                        counts.append({"count": 0, "error": str(err)})
                        continue
                np.save(out / f"{side}-{'baseline' if case is None else i - 1}.npy", ctx.logits(tokens))
                if case is not None:
                    counts.append({"count": ctx.fake_quant_sites if hook is None else hook.applied, "error": ""})
            finally:
                ctx.close()
    finally:
        model.close()
    (out / f"{side}.json").write_text(json.dumps(counts))


def change_after_decode(backend: str, n_gpu_layers: int, model_path: Path) -> dict[str, str]:
    """In this process: rules set before a context's first decode, then a change after it, on the live
    context (libllama refuses it on a context with a GPU backend: native/README.md, Vulkan; the driver's
    renewal is turned off here). The messages, "" where accepted."""
    from harness.build import build
    from harness.driver import FakeQuantError, FakeQuantRule, Model

    model = Model(model_path, build(backend), n_gpu_layers=n_gpu_layers)
    tokens = model.tokenize(TEXT)[:N_CTX]
    outcome = {}
    try:
        ctx = model.context(N_CTX)
        try:
            for step, rules in (("before", [FakeQuantRule("ffn_norm", "bf16")]),
                                ("add after", [FakeQuantRule("attn_norm", "bf16")]), ("clear after", [])):
                try:
                    ctx.set_fake_quant(rules, renew=False)
                    outcome[step] = ""
                except FakeQuantError as err:
                    outcome[step] = str(err)
                ctx.logits(tokens)
        finally:
            ctx.close()
    finally:
        model.close()
    return outcome


RENEW_CASES = ([("ffn_norm", "bf16")], [("attn_norm", "bf16"), ("result_output", "f16")], [])


def renew_against_fresh(backend: str, n_gpu_layers: int, model_path: Path) -> dict:
    """In this process: one context switched between rule sets after decodes (on a GPU backend the
    driver renews it each time) against a fresh context per rule set, logits bit for bit."""
    from harness.build import build
    from harness.driver import FakeQuantRule, Model

    model = Model(model_path, build(backend), n_gpu_layers=n_gpu_layers)
    tokens = model.tokenize(TEXT)[:N_CTX]
    cases = []
    try:
        live = model.context(N_CTX)
        try:
            baseline = live.logits(tokens).view(np.uint32)
            for case in RENEW_CASES:
                rules = [FakeQuantRule(t, f) for t, f in case]
                live.set_fake_quant(rules)
                got = live.logits(tokens)
                fresh = model.context(N_CTX)
                try:
                    fresh.set_fake_quant(rules)
                    want = fresh.logits(tokens)
                finally:
                    fresh.close()
                cases.append({"rules": case, "differ": int((got.view(np.uint32) != want.view(np.uint32)).sum()),
                              "changed": bool((got.view(np.uint32) != baseline).any())})
            renewed = live.renewed
        finally:
            live.close()
    finally:
        model.close()
    return {"gpu": model.gpu, "renewed": renewed, "cases": cases}


def _bits(path: Path) -> np.ndarray:
    return np.load(path).view(np.uint32)


def check(backend: str, n_gpu_layers: int, model_path: Path, cases: list[tuple[str, str]], out: Path,
          env: dict[str, str] | None = None, timeout: float = 900) -> tuple[bool, list[CaseResult]]:
    """Both sides, each in a child process; (reference baseline == native baseline, per-case results).
    A crash is an error with its exit status and the log's tail."""
    for side in ("native", "reference"):
        proc = subprocess.run([sys.executable, "-m", "harness.backend_check", side, backend, str(n_gpu_layers),
                               str(model_path), json.dumps(cases), str(out)],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} side exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    native, reference = (json.loads((out / f"{side}.json").read_text()) for side in ("native", "reference"))
    baseline = _bits(out / "native-baseline.npy")
    results = []
    for i, (target, fmt) in enumerate(cases):
        if native[i]["error"]:
            results.append(CaseResult(target, fmt, -1, 0, reference[i]["count"], False, native[i]["error"]))
            continue
        got, want = _bits(out / f"native-{i}.npy"), _bits(out / f"reference-{i}.npy")
        results.append(CaseResult(target, fmt, int((got != want).sum()), native[i]["count"], reference[i]["count"],
                                  not np.array_equal(got, baseline)))
    return bool(np.array_equal(baseline, _bits(out / "reference-baseline.npy"))), results


if __name__ == "__main__":
    if sys.argv[1] in ("change", "renew"):
        check_of = change_after_decode if sys.argv[1] == "change" else renew_against_fresh
        print(json.dumps(check_of(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
        sys.exit(0)
    run_side(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]),
             [tuple(c) for c in json.loads(sys.argv[5])], Path(sys.argv[6]))
