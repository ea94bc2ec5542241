"""The GPU check, one command that fits one call to a GPU machine (docs/gpu.md): build for the GPU,
find out whether and where loading a model from Python crashes, check fake quantization bit for bit
on every architecture with all layers and with part of them offloaded, and benchmark it on a model
of the design's reference shape. Everything measured goes to OUT/gpu_check.json (rewritten after
every step, so a run stopped by its time limit keeps what it finished) and the progress to
OUT/gpu_check.log.

    tools/gpu_check.sh [--pack ARCHIVE] [--backend cuda|vulkan|cpu] [--shape reference|tiny] ...
    python -m harness.gpu_check --out DIR [...]

Steps, in this order (each a process of its own or more, so a crash is a result, not the end):
  environment  nvidia-smi, nvcc, Python, cores
  build        python -m harness build --backend B (CUDA architectures: $FQ_CUDA_ARCHITECTURES or detected)
  abi          python -m harness.abi B: the bindings' ctypes mirrors against the built headers
  load         the crash hunt: the same tiny model loaded by llama-completion (with and without its
               parameter fitting), by a C program with the default parameters, by the bindings (as
               loaded, loaded RTLD_GLOBAL first, with a Python log callback), by the driver with the device
               hidden, with no layer and with every layer offloaded; a crash is rerun under cuda-gdb (or
               gdb) for a native backtrace
  rules        rules changed on a live context: harness.backend_check change (refused, or accepted),
               and a renewed context against a fresh one, bit for bit
  bench        harness.bench on a model of the reference shape (TinyLlama 1.1B: n_embd 2048, 22 layers,
               n_ff 5632, 32 heads, 4 KV heads; random F16 weights written with gguf): ffn_norm and
               ffn_norm+logits against off, pp512 and tg128, interleaved paired ratios, compute buffer
  archs        every test-llama-archs model, every name of its computed graph: native == reference
               bit for bit and equal counts, all layers offloaded, then a partial offload (1 layer)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from harness.build import ALL_LAYERS

# the design's reference shape (TinyLlama 1.1B), and a tiny one for a dry run on the CPU
SHAPES = {
    "reference": {"n_embd": 2048, "n_layer": 22, "n_ff": 5632, "n_head": 32, "n_head_kv": 4, "n_vocab": 32000},
    "tiny": {"n_embd": 256, "n_layer": 4, "n_ff": 512, "n_head": 8, "n_head_kv": 2, "n_vocab": 1024},
}
BENCH = {"reference": {"pp": 512, "tg": 128, "reps": 7}, "tiny": {"pp": 32, "tg": 4, "reps": 1}}
PARTIAL_LAYERS = 1  # the partial offload of the sweep: the last of each model's layers (most have 2)
PROBE_MODEL = "llama-dense.gguf"  # the tiny model the load probes and the rules check use


class Run:
    """The check's record: steps in order, written after each; a log beside it."""

    def __init__(self, out: Path, deadline: float) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.deadline = deadline
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
        self.log_file = open(out / "gpu_check.log", "a", buffering=1)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.started)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")

    def step(self, name: str, fn, *args, need: float = 0.0):
        """Run one step, record its outcome (ok / failed with the error / skipped for time)."""
        if self.left() < need:
            self.data["steps"][name] = {"status": "skipped", "reason": f"{self.left():.0f} s left, needs about {need:.0f}"}
            self.log(f"{name}: skipped, {self.left():.0f} s left")
            self.save()
            return None
        self.log(f"{name} ...")
        began = time.monotonic()
        try:
            value = fn(*args)
            entry = {"status": "ok", **(value if isinstance(value, dict) else {})}
        except Exception as exc:  # a failed step is a result; the next steps still run
            entry, value = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}, None
        entry["seconds"] = round(time.monotonic() - began, 1)
        self.data["steps"][name] = entry
        self.log(f"{name}: {entry['status']} in {entry['seconds']} s" +
                 (f": {entry['error'][-500:]}" if entry["status"] == "failed" else ""))
        self.save()
        return value


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """A child process's outcome: exit status (a signal by name), seconds, the ends of its output."""
    began = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    status = ("ok" if rc == 0 else f"signal {signal.Signals(-rc).name}" if isinstance(rc, int) and rc < 0
              else f"exit {rc}" if isinstance(rc, int) else "timeout")
    return {"status": status, "seconds": round(time.monotonic() - began, 1), "stdout": out[-3000:],
            "stderr": err[-6000:]}


def environment() -> dict:
    def ask(*cmd: str) -> str:
        if not shutil.which(cmd[0]):
            return f"{cmd[0]}: not installed"
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip()[-2000:]

    import importlib.util

    origins = {name: getattr(importlib.util.find_spec(name), "origin", None)
               for name in ("llama_cpp", "gguf", "yaml", "diskcache", "typing_extensions", "numpy", "ml_dtypes")}
    return {"python": sys.version, "platform": platform.platform(), "cores": os.cpu_count(), "modules": origins,
            "nvidia_smi": ask("nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader"),
            "nvcc": ask("nvcc", "--version").splitlines()[-1:],
            "env": {k: v for k, v in os.environ.items() if k.startswith(("FQ_", "CUDA", "GGML_", "LLAMA_"))}}


def build_step(backend: str) -> dict:
    from harness.build import CUDA_ARCH_ENV, build, cuda_architectures

    b = build(backend)
    if backend == "cuda":  # every child process then keys the same build without asking the GPU again
        os.environ.setdefault(CUDA_ARCH_ENV, cuda_architectures()[0])
    info = json.loads((b.bin_dir.parent / "build-info.json").read_text())
    return {"bin_dir": str(b.bin_dir), "build_info": info}


def abi_step(backend: str) -> dict:
    result = _run([sys.executable, "-m", "harness.abi", backend], timeout=300)
    if result["status"] != "ok" and "DIFFERS" not in result["stdout"]:
        raise RuntimeError(f"the ABI check did not run ({result['status']}): {result['stderr'][-1500:]}")
    return {"differences": [line for line in result["stdout"].splitlines() if line.startswith("DIFFERS")],
            "compared": result["stdout"].splitlines()[0] if result["stdout"] else ""}


# the load probes -----------------------------------------------------------------------------------

C_PROBE = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"
int main(int argc, char ** argv) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = atoi(argv[2]);
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 2; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 16; cp.n_batch = 16; cp.n_ubatch = 16;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); return 3; }
    llama_token tokens[8];
    for (int i = 0; i < 8; i++) tokens[i] = i + 1;
    int rc = llama_decode(ctx, llama_batch_get_one(tokens, 8));
    printf("decode %d\n", rc);
    llama_free(ctx);
    llama_model_free(model);
    return rc;
}
"""

# the bindings alone: no harness code; PROBE_LOG=1 sets a Python log callback as harness.driver does,
# PROBE_GLOBAL=1 loads libllama RTLD_GLOBAL before the bindings load it (RTLD_LOCAL, unlike a program's)
PY_PROBE = r"""
import ctypes, os, sys
if os.environ["PROBE_GLOBAL"] == "1":
    ctypes.CDLL(os.path.join(os.environ["LLAMA_CPP_LIB_PATH"], "libllama.so"), mode=os.RTLD_GLOBAL)
import llama_cpp.llama_cpp as ll
if os.environ["PROBE_LOG"] == "1":
    lines = []
    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def log(level, text, user):
        lines.append(text)
    ll.llama_log_set(log, None)
ll.llama_backend_init()
params = ll.llama_model_default_params()
params.n_gpu_layers = int(sys.argv[2])
model = ll.llama_model_load_from_file(sys.argv[1].encode(), params)
print("loaded" if model else "load failed")
sys.exit(0 if model else 2)
"""

DRIVER_PROBE = r"""
import sys
from pathlib import Path
from harness.build import build
from harness.driver import Model, devices
b = build(sys.argv[3])
print([f"{d.name}: {d.description} ({d.type})" for d in devices(b)])
model = Model(Path(sys.argv[1]), b, n_gpu_layers=int(sys.argv[2]))
ctx = model.context(16)
logits = ctx.logits([(7 * i + 1) % model.n_vocab for i in range(16)])
print("logits", logits.shape, bool((logits == logits).all()))
"""

HIDE_DEVICES = {"cuda": {"CUDA_VISIBLE_DEVICES": ""}, "vulkan": {"GGML_VK_VISIBLE_DEVICES": ""}}


def _backtrace(cmd: list[str], env: dict) -> str:
    """A native backtrace of a crashing command (cuda-gdb debugs host code too; else gdb), or why not."""
    debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
    if debugger is None:
        return "no cuda-gdb or gdb here"
    result = _run([debugger, "-batch", "-ex", "run", "-ex", "bt", "-ex", "info sharedlibrary", "--args", *cmd],
                  timeout=150, env=env)
    return result["stdout"][-6000:] + result["stderr"][-2000:]


def load_step(backend: str, model: Path, gpu_layers: int, work: Path) -> dict:
    """Where, if anywhere, loading the model crashes: libllama alone (C), the bindings without and with
    a log callback, the driver with the device hidden, with 0 and with `gpu_layers` layers."""
    from harness.abi import headers
    from harness.build import build
    from harness.source import HEADER_DIRS

    b = build(backend)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(b.bin_dir), PYTHONFAULTHANDLER="1")
    probes: dict[str, tuple[list[str], dict]] = {}
    cc = shutil.which("cc") or shutil.which("gcc")
    program = work / "load_probe"
    (work / "load_probe.c").write_text(C_PROBE)
    compiled = subprocess.run([cc or "cc", "-std=c11", *(f"-I{headers() / d}" for d in HEADER_DIRS),
                               str(work / "load_probe.c"), f"-L{b.bin_dir}", "-lllama", f"-Wl,-rpath,{b.bin_dir}",
                               "-o", str(program)], capture_output=True, text=True)
    results: dict = {}
    cli = [str(b.tool("llama-completion")), "-m", str(model), "-ngl", str(gpu_layers), "-p", "tok_1 tok_2", "-n", "4",
           "-no-cnv", "--no-warmup"]
    probes["llama-completion"] = (cli, env)
    probes["llama-completion -fit off"] = (cli + ["-fit", "off"], env)
    if compiled.returncode == 0:
        probes["c"] = ([str(program), str(model), str(gpu_layers)], env)
    else:
        results["c"] = {"status": "not compiled", "stderr": compiled.stderr[-2000:]}
    (work / "py_probe.py").write_text(PY_PROBE)
    (work / "driver_probe.py").write_text(DRIVER_PROBE)
    py = [sys.executable, "-X", "faulthandler"]
    bindings = py + [str(work / "py_probe.py"), str(model), str(gpu_layers)]
    probes["bindings"] = (bindings, dict(env, PROBE_LOG="0", PROBE_GLOBAL="0"))
    probes["bindings, RTLD_GLOBAL"] = (bindings, dict(env, PROBE_LOG="0", PROBE_GLOBAL="1"))
    probes["bindings+log"] = (bindings, dict(env, PROBE_LOG="1", PROBE_GLOBAL="0"))
    driver = py + [str(work / "driver_probe.py"), str(model)]
    if backend in HIDE_DEVICES:
        probes["driver, device hidden"] = (driver + ["0", backend], dict(env, **HIDE_DEVICES[backend]))
    probes["driver, 0 layers"] = (driver + ["0", backend], env)
    probes[f"driver, {gpu_layers} layers"] = (driver + [str(gpu_layers), backend], env)
    traced = set()  # one native backtrace for a crash outside Python, one inside (a debugger run is slow)
    for name, (cmd, probe_env) in probes.items():
        results[name] = _run(cmd, timeout=180, env=probe_env)
        kind = cmd[0] == sys.executable
        if results[name]["status"].startswith("signal") and kind not in traced:
            traced.add(kind)
            results[name]["backtrace"] = _backtrace(cmd, probe_env)
    crashed = [n for n, r in results.items() if r["status"] != "ok"]
    return {"model": str(model), "gpu_layers": gpu_layers, "probes": results,
            "summary": "every probe loaded the model" if not crashed else f"failed: {', '.join(crashed)}"}


def rules_step(backend: str, model: Path, gpu_layers: int) -> dict:
    """A change of rules after a decode: libllama's answer, and the driver's renewed context against a
    fresh one (logits bit for bit)."""
    change = _run([sys.executable, "-m", "harness.backend_check", "change", backend, str(gpu_layers), str(model)],
                  timeout=300)
    if change["status"] != "ok":
        raise RuntimeError(f"backend_check change: {change['status']}: {change['stderr'][-1500:]}")
    renewal = _run([sys.executable, "-m", "harness.backend_check", "renew", backend, str(gpu_layers), str(model)],
                   timeout=300)
    if renewal["status"] != "ok":
        raise RuntimeError(f"backend_check renew: {renewal['status']}: {renewal['stderr'][-1500:]}")
    return {"change_after_decode": json.loads(change["stdout"].strip().splitlines()[-1]),
            "renewal": json.loads(renewal["stdout"].strip().splitlines()[-1])}


def write_llama(path: Path, n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int, n_vocab: int,
                seed: int = 0) -> Path:
    """A llama-architecture GGUF of the given shape: random F16 matrices (N(0, 0.02)), F32 norms of 1, the
    `test` tokenizer of test-llama-archs (token ids from 5-byte chunks; no end token, so generation
    never stops early)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)).astype(np.float16)

    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("test")
    w.add_token_list([f"tok_{i}" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    ones = np.ones(n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", matrix(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", matrix(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", matrix(n_head_kv * head_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", matrix(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", matrix(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", matrix(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def bench_step(backend: str, shape: str, model_dir: Path, out: Path, gpu_layers: int) -> dict:
    """harness.bench in a process of its own (a crash there must not end the check)."""
    dims = SHAPES[shape]
    path = model_dir / f"llama-{shape}-f16.gguf"
    if not path.exists():
        write_llama(path, **dims)
    settings = BENCH[shape]
    bench = _run([sys.executable, "-m", "harness", "bench", "--models", str(path), "--backend", backend,
                  "--gpu-layers", str(gpu_layers), "--pp", str(settings["pp"]), "--tg", str(settings["tg"]),
                  "--reps", str(settings["reps"]), "--out", str(out / "bench.json"), "--no-suite"], timeout=400)
    if bench["status"] != "ok":
        raise RuntimeError(f"harness bench: {bench['status']}:\n{bench['stderr'][-3000:]}")
    result = json.loads((out / "bench.json").read_text())
    summary = {}
    for cfg, entry in result["models"][str(path)]["configs"].items():
        summary[cfg] = {phase: {"tokens_per_s": round(entry[phase]["tokens_per_s"], 1),
                                "overhead_pct": round(entry[phase]["ratio"]["overhead_pct"], 2),
                                "spread_pct": [round((entry[phase]["ratio"][k] - 1) * 100, 2) for k in ("min", "max")],
                                "meets_target": entry[phase]["meets_target"]} for phase in ("pp", "tg")}
        summary[cfg]["compute_buffer_mib"] = entry["memory"]["compute_buffer_mib"]
    return {"model": str(path), "shape": dims, "settings": settings, "bench_json": str(out / "bench.json"),
            "table": bench["stderr"].strip().splitlines()[-6:], "summary": summary,
            "devices": result["machine"]["devices"]}


def archs_step(run: Run, backend: str, gpu_layers: int, workers: int, only: list[str], label: str) -> dict:
    """The sweep of harness.archs on the backend's build, a process per model, stopping (not starting
    more models, cutting the running ones short) when the time is nearly up; the table and every
    model's result. The count so far is saved as the models finish."""
    from harness.archs import _check_in_subprocess, model_paths, table
    from harness.build import build

    paths = model_paths(build(backend), only)
    margin = 20.0
    lock = threading.Lock()
    finished: list[str] = []

    def one(path: Path):
        if run.left() < margin:
            return None
        result = _check_in_subprocess(path, backend, gpu_layers, timeout=max(run.left() - 5, 10))
        with lock:
            finished.append(f"{result.model}: {result.status}")
            run.data["steps"][f"archs_{label}"] = {"status": "running", "finished": list(finished)}
            run.save()
        return result

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    done = [r for r in results if r is not None]
    not_run = [p.name for p, r in zip(paths, results) if r is None]
    text = table(done, f", {backend} build with {gpu_layers} layers offloaded")
    (run.out / f"archs-{label}.md").write_text(text)
    exceptions = {r.model: r.status if r.status != "mismatch" else "; ".join(r.mismatches)
                  for r in done if r.status != "ok"}
    return {"gpu_layers": gpu_layers, "models": len(paths), "checked": len(done),
            "bit_identical": sum(r.status == "ok" for r in done), "exceptions": exceptions, "not_run": not_run,
            "results": [asdict(r) for r in done], "table": f"archs-{label}.md"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")),
                   help="where gpu_check.json, gpu_check.log, bench.json and the tables go (default: $OUT)")
    p.add_argument("--backend", default="cuda", choices=("cuda", "vulkan", "cpu"))
    p.add_argument("--shape", default="reference", choices=sorted(SHAPES), help="the bench model's shape")
    p.add_argument("--deadline", type=float, default=570.0,
                   help="seconds from the start after which no step or model is started (default 570)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="sweep processes at once")
    p.add_argument("--only", nargs="+", default=[], help="sweep only models whose file names start with these")
    p.add_argument("--skip", nargs="+", default=[], choices=("load", "rules", "bench", "archs"),
                   help="steps to leave out")
    args = p.parse_args(argv)
    run = Run(args.out, args.deadline)
    run.data["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    run.step("environment", environment)
    if run.step("build", build_step, args.backend) is None:
        run.log("no build: nothing else can run")
        return 1
    run.step("abi", abi_step, args.backend)
    from harness.archs import arch_models
    from harness.build import build

    probe_model = arch_models(build(args.backend)) / PROBE_MODEL
    gpu = 0 if args.backend == "cpu" else ALL_LAYERS
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    if "load" not in args.skip:
        run.step("load", load_step, args.backend, probe_model, gpu, work, need=60)
    if "rules" not in args.skip:
        run.step("rules", rules_step, args.backend, probe_model, gpu, need=60)
    if "bench" not in args.skip:
        model_dir = Path(os.environ.get("FQ_GPU_CHECK_MODELS", "/tmp/fq-gpu-check-models"))
        model_dir.mkdir(parents=True, exist_ok=True)
        run.step("bench", bench_step, args.backend, args.shape, model_dir, args.out, gpu, need=120)
    if "archs" not in args.skip:
        run.step("archs_all", archs_step, run, args.backend, gpu, args.workers, args.only, "all", need=60)
        if args.backend != "cpu":
            run.step("archs_partial", archs_step, run, args.backend, PARTIAL_LAYERS, args.workers, args.only,
                     "partial", need=60)
    run.log(f"done: {args.out / 'gpu_check.json'}")
    run.save()
    return 0 if all(s["status"] == "ok" for s in run.data["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
