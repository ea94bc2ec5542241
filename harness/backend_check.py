"""Native fake quantization against the reference on another backend (Vulkan, CUDA): run in a
process of its own, since libllama is bound once per process and a backend's build is a different
library. The reference rounds the device tensor in the eval callback (ggml_backend_tensor_get/_set).

    python -m harness.backend_check BACKEND N_GPU_LAYERS MODEL.gguf CASES_JSON  ->  one JSON line
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; "
        "the third introduced special relativity. 17 + 25 = 42, and 6 * 7 = 42 as well.")
N_CTX = 64


@dataclass
class CaseResult:
    target: str
    fmt: str
    differ: int           # logits whose bits differ from the reference's
    sites: int
    applied: int          # tensors the reference rounded
    changed: bool         # the logits differ from the baseline
    error: str = ""       # libllama's message when the setting was refused


def run_cases(backend: str, n_gpu_layers: int, model_path: Path, cases: list[tuple[str, str]]) -> dict:
    """In this process: load the model with `n_gpu_layers` offloaded and compare every case."""
    import numpy as np

    from harness.build import build
    from harness.driver import FakeQuantError, FakeQuantRule, Model
    from harness.reference import ReferenceFakeQuant

    model = Model(model_path, build(backend), n_gpu_layers=n_gpu_layers)
    tokens = model.tokenize(TEXT)[:N_CTX]
    native = model.context(N_CTX)
    hook = ReferenceFakeQuant([], model.n_layer)
    ref = model.context(N_CTX, tensor_hook=hook)
    results = []
    try:
        baseline = native.logits(tokens)
        callback_baseline = ref.logits(tokens)
        for target, fmt in cases:
            rules = [FakeQuantRule(target, fmt)]
            try:
                native.set_fake_quant(rules)
            except FakeQuantError as err:
                results.append(CaseResult(target, fmt, -1, 0, 0, False, str(err)))
                continue
            hook.set_rules(rules)
            got, sites = native.logits(tokens), native.fake_quant_sites
            want, applied = ref.logits(tokens), hook.applied
            native.set_fake_quant([])
            hook.set_rules([])
            results.append(CaseResult(target, fmt, int((got.view(np.uint32) != want.view(np.uint32)).sum()), sites,
                                      applied, not np.array_equal(got.view(np.uint32), baseline.view(np.uint32))))
        return {"baseline_equal": bool(np.array_equal(baseline.view(np.uint32), callback_baseline.view(np.uint32))),
                "cases": [asdict(r) for r in results]}
    finally:
        native.close()
        ref.close()
        model.close()


def check(backend: str, n_gpu_layers: int, model_path: Path, cases: list[tuple[str, str]],
          env: dict[str, str] | None = None, timeout: float = 900) -> dict:
    """run_cases in a child process; a crash is an error with its signal and the log's tail."""
    proc = subprocess.run([sys.executable, "-m", "harness.backend_check", backend, str(n_gpu_layers), str(model_path),
                           json.dumps(cases)], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"backend check exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_cases(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]),
                               [tuple(c) for c in json.loads(sys.argv[4])])))
