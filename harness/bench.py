"""Benchmark: what native fake quantization costs in speed and memory, against "off" and the
numpy reference (eval callback).

Speed: every configuration gets its own context on the same model, so switching never
re-reserves inside a timed call. Rounds are interleaved (one round = every configuration once,
in an order rotated per round so no configuration always runs first), after one uncounted
warm-up round; each configuration's time is divided by "off"'s time of the same round, which
cancels the drift of a busy machine, and the median of those paired ratios is the overhead.

Prompt processing computes logits for every row of the batch (first=0), the suite's own
workload (per-position KL and perplexity), so "ffn_norm+logits" rounds a full [pp, vocab]
tensor: its worst case. Generation is greedy from a short prompt (its decode is included).

Memory: each configuration runs once more in a fresh interpreter, which reports libllama's
compute-buffer size (from its log; setting rules re-reserves with a new scheduler, so the size
is the fake-quantized graph's own) and its peak RSS after one prompt batch.

Instructions (`--instructions`): wall time on a busy 2-core machine scatters far more than a 1 %
effect, so each configuration also runs llama-completion under callgrind at one thread, twice,
generating two token counts; the difference of the instruction counts over the difference of the
decode runs is the instructions per generated token, with loading, the prompt and graph building
cancelled out.

Backend: `--backend vulkan` (or cuda) runs the same with that build and every layer offloaded
(`--gpu-layers N`: N of them), so the fake-quant nodes are the portable casts on the device; the
compute buffer is the device's. libllama is bound once per process, so the whole run, memory
children included, uses that build. On Mesa's lavapipe (a CPU Vulkan driver) the device is hidden
unless GGML_VK_VISIBLE_DEVICES=0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from harness import driver
from harness.build import Build, build, offload
from harness.cache import HarnessError, cpu_model, progress
from harness.corpus import load_corpus
from harness.driver import Context, FakeQuantRule, Model
from harness.formats import TABLE, Kind
from harness.models import DERIVED, get_model
from harness.reference import ReferenceFakeQuant

TARGET_OVERHEAD_PCT = 1.0  # for the native configurations
TG_PROMPT = "Once upon a time, in a small village by the sea,"
FFN = FakeQuantRule("ffn_norm", "bf16")
LOGITS = FakeQuantRule("result_output", "bf16")
# name -> (rules, applied by the numpy reference hook instead of the native graph nodes)
CONFIGS: dict[str, tuple[tuple[FakeQuantRule, ...], bool]] = {
    "off": ((), False),
    "ffn_norm": ((FFN,), False),
    "ffn_norm+logits": ((FFN, LOGITS), False),
    "reference": ((FFN,), True),
}
NATIVE_ON = ("ffn_norm", "ffn_norm+logits")
FORMAT_CONFIG = "ffn_norm:"  # + a format of harness.formats: that format at ffn_norm, every layer (--formats)


def configs_for(formats: Sequence[str] = ()) -> dict[str, tuple[tuple[FakeQuantRule, ...], bool]]:
    """CONFIGS plus `ffn_norm:FMT` for each format asked for (an unknown name is an error naming the allowed)."""
    unknown = [f for f in formats if f not in TABLE]
    if unknown:
        raise HarnessError(f"unknown format {', '.join(map(repr, unknown))} (allowed: {', '.join(TABLE)})")
    return CONFIGS | {f"{FORMAT_CONFIG}{f}": ((FakeQuantRule("ffn_norm", f),), False) for f in formats}


def has_target(config: str) -> bool:
    """The 1 % target holds the native configurations: bf16 and, of --formats, the per-row and block
    formats (issue 21); a per-tensor scale needs the whole tensor first and has none."""
    if config in NATIVE_ON:
        return True
    return config.startswith(FORMAT_CONFIG) and TABLE[config[len(FORMAT_CONFIG):]].kind is not Kind.TENSOR
PHASES = ("pp", "tg")
_BUFFER_LINE = re.compile(r"(\S+) compute buffer size =\s*([0-9.]+) MiB")
# the buffer type that holds each backend's compute buffer with every layer offloaded
DEVICE_BUFFER = {"cpu": "CPU", "vulkan": "Vulkan0", "cuda": "CUDA0"}


def paired_ratios(times: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """Median and spread of time/base paired by round, and the overhead of the median ratio."""
    if not times or len(times) != len(base):
        raise ValueError(f"need equally many samples, got {len(times)} and {len(base)}")
    ratios = [t / b for t, b in zip(times, base)]
    median = statistics.median(ratios)
    return {"median": median, "min": min(ratios), "max": max(ratios), "overhead_pct": (median - 1) * 100}


def logged_buffer_mib(lines: Sequence[str], backend: str = "cpu") -> float | None:
    """The size of `backend`'s compute buffer in the last of libllama's log `lines` that gives it
    (logged at context creation and each re-reserve), or None."""
    buffer = DEVICE_BUFFER[backend]
    for line in reversed(lines):
        if (m := _BUFFER_LINE.search(line)) and m[1] == buffer:
            return float(m[2])
    return None


def compute_buffer_mib(backend: str = "cpu") -> float:
    """The size of `backend`'s compute buffer that libllama logged last in this process; a clear
    error when that buffer never appeared (nothing was offloaded)."""
    if (size := logged_buffer_mib(driver._log_lines, backend)) is not None:
        return size
    buffer = DEVICE_BUFFER[backend]
    hint = " (on lavapipe set GGML_VK_VISIBLE_DEVICES=0)" if backend == "vulkan" else ""
    raise HarnessError(f"libllama logged no '{buffer} compute buffer size' line: no {backend} device took the "
                       f"layers{hint}")


def make_context(model: Model, rules: Sequence[FakeQuantRule], reference: bool, n_ctx: int,
                 threads: int) -> tuple[Context, ReferenceFakeQuant | None]:
    hook = ReferenceFakeQuant(rules, model.n_layer) if reference else None
    ctx = model.context(n_ctx, threads, tensor_hook=hook)
    if rules and not reference:
        ctx.set_fake_quant(rules)
    return ctx, hook


def _child() -> None:
    """Run in a fresh interpreter: one configuration, one prompt batch, then report memory."""
    spec = json.load(sys.stdin)
    backend = spec["backend"]
    model = Model(Path(spec["model"]), build(backend), n_gpu_layers=spec["gpu_layers"])
    ctx, _ = make_context(model, [FakeQuantRule(**r) for r in spec["rules"]], spec["reference"], spec["n_ctx"],
                          spec["threads"])
    mib = compute_buffer_mib(backend)
    ctx.logits(spec["tokens"], copy=False)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the spawning parent's peak into ru_maxrss
    # across a vfork+exec (Python's subprocess), so every child would report the parent's peak
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"compute_buffer_mib": mib, "max_rss_kib": int(hwm.split()[1])}))


def _memory(model_path: Path, backend: str, gpu_layers: int, config: str, setting: tuple, n_ctx: int, threads: int,
            tokens: list[int]) -> dict[str, float]:
    rules, reference = setting
    spec = {"model": str(model_path), "backend": backend, "gpu_layers": gpu_layers, "config": config,
            "rules": [asdict(r) for r in rules], "reference": reference, "n_ctx": n_ctx, "threads": threads,
            "tokens": tokens}
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this same harness
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", "from harness.bench import _child; _child()"],
                          input=json.dumps(spec), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise HarnessError(f"memory run of {config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _measure(ctx: Context, phase: str, pp: list[int], prompt: list[int], tg_tokens: int) -> dict[str, float]:
    """Wall and in-decode seconds of one prompt batch or greedy generation, with its token count
    (configurations are compared per token: a generation can stop early at an end token)."""
    compute0 = ctx.compute_seconds
    started = time.perf_counter()
    if phase == "pp":
        ctx.logits(pp, first=0, copy=False)
        n = len(pp)
    else:
        n = len(ctx.generate(prompt, tg_tokens))
    wall = time.perf_counter() - started
    if n == 0:
        raise HarnessError("generation ended at once (end of generation token): no tokens to time")
    return {"wall_s": wall, "compute_s": ctx.compute_seconds - compute0, "tokens": n}


def _bench_model(name: str, b: Build, backend: str, gpu_layers: int, pp_tokens: int, tg_tokens: int,
                 repetitions: int, threads: int, configs: dict = CONFIGS) -> dict:
    # derived models are made by the CPU build's llama-quantize (a subprocess); other models need no build
    file = get_model(name, build() if name in DERIVED else None)
    model = Model(file.path, b, n_gpu_layers=gpu_layers)
    text = load_corpus().text
    pp = model.tokenize(text[: pp_tokens * 20])[:pp_tokens]
    if len(pp) < pp_tokens:
        raise HarnessError(f"the corpus gives only {len(pp)} of {pp_tokens} prompt tokens")
    prompt = model.tokenize(TG_PROMPT)
    n_ctx = max(pp_tokens, len(prompt) + tg_tokens)
    contexts = {cfg: make_context(model, *configs[cfg], n_ctx, threads) for cfg in configs}
    raw: dict[str, dict[str, list[dict[str, float]]]] = {cfg: {ph: [] for ph in PHASES} for cfg in configs}
    order = list(configs)
    try:
        for rnd in range(repetitions + 1):  # round 0: warm-up, not counted
            progress(f"bench {name}: {'warm-up' if rnd == 0 else f'round {rnd}/{repetitions}'}")
            for cfg in order[rnd % len(order):] + order[: rnd % len(order)]:
                for phase in PHASES:
                    sample = _measure(contexts[cfg][0], phase, pp, prompt, tg_tokens)
                    if rnd:
                        raw[cfg][phase].append(sample)
        applied = {cfg: (hook.applied if hook else ctx.fake_quant_applied) for cfg, (ctx, hook) in contexts.items()}
    finally:
        for ctx, _ in contexts.values():
            ctx.close()
        model.close()

    memory = {cfg: _memory(file.path, backend, gpu_layers, cfg, configs[cfg], n_ctx, threads, pp) for cfg in configs}
    measured = {}
    for cfg, (rules, reference) in configs.items():
        entry: dict = {"rules": [asdict(r) for r in rules], "reference": reference, "applied": applied[cfg]}
        for phase in PHASES:
            per_token = {k: [s[k] / s["tokens"] for s in raw[cfg][phase]] for k in ("wall_s", "compute_s")}
            base = {k: [s[k] / s["tokens"] for s in raw["off"][phase]] for k in ("wall_s", "compute_s")}
            wall = paired_ratios(per_token["wall_s"], base["wall_s"])
            entry[phase] = {
                "tokens_per_s": 1 / statistics.median(per_token["wall_s"]),
                "median_s": statistics.median(s["wall_s"] for s in raw[cfg][phase]),
                "median_compute_s": statistics.median(s["compute_s"] for s in raw[cfg][phase]),
                "ratio": wall,
                "compute_ratio": paired_ratios(per_token["compute_s"], base["compute_s"]),
                "meets_target": wall["overhead_pct"] <= TARGET_OVERHEAD_PCT if has_target(cfg) else None,
                "samples": raw[cfg][phase],
            }
        mem, off = memory[cfg], memory["off"]
        entry["memory"] = dict(mem, compute_buffer_ratio=mem["compute_buffer_mib"] / off["compute_buffer_mib"],
                               rss_ratio=mem["max_rss_kib"] / off["max_rss_kib"])
        measured[cfg] = entry
    return {"path": str(file.path), "sha256": file.sha256, "n_layer": model.n_layer, "n_ctx": n_ctx,
            "configs": measured}


def _machine(threads: int, b: Build, backend: str, gpu_layers: int) -> dict:
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "build_key": b.fingerprint["key"], "backend": backend,
            "n_gpu_layers": gpu_layers, "devices": [asdict(d) for d in driver.devices(b)],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}


def _build_times(b: Build, backend: str) -> dict[str, float | None]:
    """Cold: what the cached build recorded when it compiled; warm: a cached build() call now."""
    info = json.loads((b.bin_dir.parent / "build-info.json").read_text())
    warm = []
    for _ in range(3):
        started = time.perf_counter()
        build(backend)
        warm.append(time.perf_counter() - started)
    cold = info.get("build_seconds")
    return {"cold_s": float(cold) if cold is not None else None, "warm_s": statistics.median(warm)}


def _suite() -> dict | None:
    """The suite's own share of wall time inside llama.cpp, from the last results file: each
    group records its wall time and the time spent in llama_decode (target >= 90 %)."""
    from harness.verdicts import results_path

    path = results_path()
    if not path.exists():
        return None
    prov = json.loads(path.read_text())["provenance"]
    wall, compute = prov["group_wall_seconds"], prov["group_compute_seconds"]
    return {"results": str(path), "group_wall_s": wall, "group_compute_s": compute,
            "compute_share": compute / wall if wall else None, "target_share": 0.9}


def _summary(result: dict) -> str:
    m = result["machine"]
    gpus = [f"{d['name']} ({d['description']})" for d in m.get("devices", []) if d["type"] in ("GPU", "IGPU")]
    lines = [f"{m['cpu_model']} ({m['cpu_count']} cpus, {m['threads']} threads), build {m['build_key']} "
             f"({m['backend']}, {m['n_gpu_layers']} layers offloaded{' to ' + ', '.join(gpus) if gpus else ''}); "
             f"build cold {result['build']['cold_s']} s, warm {result['build']['warm_s'] * 1000:.0f} ms",
             f"target: native overhead <= {TARGET_OVERHEAD_PCT:g} % (median of per-round ratios to off; "
             f"[min..max] over {result['settings']['repetitions']} rounds)",
             f"{'model':14} {'config':24} {'pp tok/s':>9} {'pp ovh %':>22} {'tg tok/s':>9} {'tg ovh %':>22}"
             f" {'buf MiB':>8} {'rss MiB':>8}"]
    for name, res in result["models"].items():
        for cfg, e in res["configs"].items():
            cells = []
            for phase in PHASES:
                r = e[phase]["ratio"]
                mark = {True: " ok", False: " !!", None: ""}[e[phase]["meets_target"]]
                spread = f"{r['overhead_pct']:+.1f} [{(r['min'] - 1) * 100:+.1f}..{(r['max'] - 1) * 100:+.1f}]{mark}"
                cells.append(f"{e[phase]['tokens_per_s']:9.1f} {spread:>22}")
            lines.append(f"{name:14} {cfg:24} {' '.join(cells)} {e['memory']['compute_buffer_mib']:8.2f}"
                         f" {e['memory']['max_rss_kib'] / 1024:8.1f}")
    if suite := result.get("suite"):
        lines.append(f"suite ({suite['results']}): {suite['group_compute_s']:.0f} s of {suite['group_wall_s']:.0f} s "
                     f"group wall time inside llama_decode = {suite['compute_share']:.1%} (target >= 90 %)")
    return "\n".join(lines)


def run_bench(models: Sequence[str] = ("smollm2-f32", "smollm2-q4_1"), *, pp_tokens: int = 512, tg_tokens: int = 128,
              repetitions: int = 5, threads: int | None = None, out: Path | None = None,
              backend: str | None = None, gpu_layers: int | None = None, suite: bool = True,
              formats: Sequence[str] = ()) -> dict:
    """Measure every model and configuration, write the JSON to `out`, print a table to stderr.
    `suite`: also read the suite's share of time in llama.cpp from the last results file."""
    if pp_tokens < 1 or tg_tokens < 1 or repetitions < 1:
        raise HarnessError("pp, tg and repetitions must be at least 1")
    configs = configs_for(formats)
    backend, gpu_layers = offload(backend, gpu_layers)
    b = build(backend)
    threads = threads or driver.default_threads()
    result = {
        "machine": _machine(threads, b, backend, gpu_layers),
        "build": _build_times(b, backend),
        "settings": {"pp_tokens": pp_tokens, "tg_tokens": tg_tokens, "repetitions": repetitions,
                     "pp_logits_rows": "all", "tg_prompt": TG_PROMPT, "formats": list(formats)},
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "models": {name: _bench_model(name, b, backend, gpu_layers, pp_tokens, tg_tokens, repetitions, threads,
                                      configs) for name in models},
        "suite": _suite() if suite else None,
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = out or Path("report") / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(_summary(result), file=sys.stderr)
    return result


INSTR_PROMPT = "The history of"
INSTR_TOKENS = (48, 16)  # generated tokens of the two runs; the per-token count is their difference's
INSTR_BASE = ("off", "ffn_norm")  # beside the ffn_norm:FMT configurations of --formats
_CALLGRIND_SUMMARY = re.compile(r"^summary:\s*(\d+)\s*$", re.M)
_DECODE_NAME = re.compile(r"^c?fn=\((\d+)\) llama_context::decode\(", re.M)


@dataclass(frozen=True)
class CallgrindRun:
    """One llama-completion run under callgrind: tokens asked for, instructions counted, and the
    calls of llama_context::decode it made (the prompt's and one per further token: `tokens` when
    none ended early)."""

    tokens: int
    instructions: int
    decode_calls: int


def cli_flags(rules: Sequence[FakeQuantRule]) -> list[str]:
    """llama-completion's flags for a configuration's rules (native/README.md's flag table)."""
    flags = []
    for r in rules:
        flag = {"ffn_norm": "--fake-quant-ffn-norm", "result_output": "--fake-quant"}.get(r.target)
        if flag is None or r.layers != driver.EVERY_LAYER or r.scale != 1.0:
            raise HarnessError(f"no llama-completion flag for {r} (allowed: ffn_norm or result_output, every layer, "
                               "scale 1)")
        flags += [flag, r.fmt]
    return flags


def instruction_configs(formats: Sequence[str] = ()) -> dict[str, list[str]]:
    """Configuration -> llama-completion flags: off, ffn_norm bf16 and ffn_norm:FMT for each format
    (the numpy reference is a Python hook: llama-completion cannot run it)."""
    return {cfg: cli_flags(rules) for cfg, (rules, _) in configs_for(formats).items()
            if cfg in INSTR_BASE or cfg.startswith(FORMAT_CONFIG)}


def callgrind_command(tool: Path, model: Path, tokens: int, flags: Sequence[str], out_file: Path) -> list[str]:
    """Greedy generation of exactly `tokens` tokens (no end token, no chat mode) at one thread."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", str(tool), "-m", str(model),
            "-p", INSTR_PROMPT, "-t", "1", "--temp", "0", "--ignore-eos", "--no-warmup", "-no-cnv",
            "-n", str(tokens), *flags]


def callgrind_total(text: str) -> int:
    """The instruction count (event Ir) in a callgrind output file's summary line."""
    if m := _CALLGRIND_SUMMARY.search(text):
        return int(m[1])
    raise HarnessError("the callgrind output has no 'summary:' line")


def decode_calls(text: str) -> int:
    """The calls of llama_context::decode in a callgrind output file: the `calls=` lines under each
    call site of it (`cfn=(id)`, its name given once; llama-completion's own log of its decode runs
    is written by a thread that can lose its last lines at exit)."""
    ids = set(_DECODE_NAME.findall(text))
    if not ids:
        raise HarnessError("the callgrind output has no llama_context::decode")
    lines = text.splitlines()
    sites = [i for i, line in enumerate(lines) if line.startswith("cfn=(") and line[5:].split(")")[0] in ids]
    return sum(int(lines[i + 1].split()[0].removeprefix("calls=")) for i in sites
               if i + 1 < len(lines) and lines[i + 1].startswith("calls="))


def per_token(long: CallgrindRun, short: CallgrindRun) -> float:
    """Instructions per generated token: the difference of two runs over the difference of their
    decode calls, which must be the difference of the tokens asked for (no run stopped early)."""
    asked, ran = long.tokens - short.tokens, long.decode_calls - short.decode_calls
    if asked < 1:
        raise HarnessError(f"the token counts must differ, longer first: got {long.tokens} and {short.tokens}")
    if ran != asked:
        raise HarnessError(f"the runs decoded {ran} more tokens, not the {asked} asked for (one ended early)")
    return (long.instructions - short.instructions) / ran


def run_callgrind(tool: Path, model: Path, tokens: int, flags: Sequence[str]) -> CallgrindRun:
    """Run llama-completion under callgrind (nice'd: counts do not depend on the machine's load)."""
    with tempfile.TemporaryDirectory(prefix="fq-callgrind-") as tmp:
        out_file = Path(tmp) / "callgrind.out"
        proc = subprocess.run(["nice", *callgrind_command(tool, model, tokens, flags, out_file)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise HarnessError(f"callgrind run (-n {tokens} {' '.join(flags)}) failed:\n{proc.stderr[-2000:]}")
        text = out_file.read_text()
        return CallgrindRun(tokens, callgrind_total(text), decode_calls(text))


def instruction_table(runs: dict[str, Sequence[CallgrindRun]]) -> dict[str, dict]:
    """Configuration -> its runs, instructions per token, overhead against off and the 1 % target."""
    counts = {cfg: per_token(*sorted(r, key=lambda run: -run.tokens)) for cfg, r in runs.items()}
    return {cfg: {"runs": [asdict(r) for r in runs[cfg]], "instructions_per_token": counts[cfg],
                  "overhead_pct": (counts[cfg] / counts["off"] - 1) * 100,
                  "meets_target": (counts[cfg] / counts["off"] - 1) * 100 <= TARGET_OVERHEAD_PCT
                  if has_target(cfg) else None}
            for cfg in runs}


Runner = Callable[[Path, Path, int, Sequence[str]], CallgrindRun]


def _instructions_model(name: str, b: Build, configs: dict[str, list[str]], tokens: Sequence[int], repeat: str,
                        jobs: int, runner: Runner) -> dict:
    file = get_model(name, b)
    tool = b.tool("llama-completion")
    # one run per distinct command (ffn_norm and ffn_norm:bf16 share theirs); the repeat runs again
    tasks = list(dict.fromkeys((tuple(flags), n) for flags in configs.values() for n in tokens))
    tasks += [(tuple(configs[repeat]), n) for n in tokens]
    done: list[int] = []

    def one(task: tuple[tuple[str, ...], int]) -> CallgrindRun:
        started = time.perf_counter()
        run = runner(tool, file.path, task[1], task[0])
        done.append(1)
        progress(f"callgrind {name} -n {task[1]} {' '.join(task[0]) or 'off'}: {run.instructions:,} instructions "
                 f"({time.perf_counter() - started:.0f} s; {len(done)}/{len(tasks)})")
        return run

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, tasks))
    first = dict(zip(tasks[: -len(tokens)], results))
    again = results[-len(tokens):]
    table = instruction_table({cfg: [first[tuple(flags), n] for n in tokens] for cfg, flags in configs.items()})
    for cfg, flags in configs.items():
        table[cfg]["flags"] = flags
    once = [first[tuple(configs[repeat]), n] for n in tokens]
    # the run-to-run spread of a per-token count, in % of off's: a difference within it decides nothing
    spread = abs(per_token(*again) - per_token(*once)) / table["off"]["instructions_per_token"] * 100
    return {"path": str(file.path), "sha256": file.sha256, "configs": table,
            "repeat": {"config": repeat, "runs": [asdict(r) for r in once], "again": [asdict(r) for r in again],
                       "identical": once == again, "spread_pct": spread}}


def _instructions_summary(result: dict) -> str:
    s = result["settings"]
    lines = [f"instructions per generated token: callgrind, llama-completion -t 1, -n {s['tokens'][0]} minus "
             f"-n {s['tokens'][1]}, build {result['machine']['build_key']}; target: per-row and block formats "
             f"<= {TARGET_OVERHEAD_PCT:g} % over off",
             f"{'model':14} {'config':26} {'M instr/token':>14} {'overhead %':>11}"]
    for name, res in result["models"].items():
        for cfg, e in res["configs"].items():
            mark = {True: " ok", False: " !!", None: ""}[e["meets_target"]]
            count = e["instructions_per_token"] / 1e6
            lines.append(f"{name:14} {cfg:26} {count:14.3f} {e['overhead_pct']:+11.3f}{mark}")
        rep = res["repeat"]
        lines.append(f"{name}: {rep['config']} run twice: counts {'identical' if rep['identical'] else 'differ'}, "
                     f"per-token count {rep['spread_pct']:.3f} % of off apart")
    return "\n".join(lines)


def run_instructions(models: Sequence[str] = ("smollm2-q4_1",), formats: Sequence[str] = (), *,
                     tokens: Sequence[int] = INSTR_TOKENS, repeat: str = "off", jobs: int = 1,
                     out: Path | None = None, runner: Runner = run_callgrind) -> dict:
    """Instructions per generated token of each configuration on the cached CPU build, written to
    `out` as JSON with a table on stderr; `repeat`'s runs are made twice: its spread is the resolution."""
    configs = instruction_configs(formats)
    if len(tokens) != 2 or tokens[0] <= tokens[1] or tokens[1] < 1:
        raise HarnessError(f"tokens must be two counts, the longer first, both >= 1: got {list(tokens)}")
    if repeat not in configs:
        raise HarnessError(f"repeat config {repeat!r} is not measured (allowed: {', '.join(configs)})")
    if jobs < 1:
        raise HarnessError(f"jobs must be at least 1, got {jobs}")
    if runner is run_callgrind and not shutil.which("valgrind"):
        raise HarnessError("valgrind is not on PATH (Debian: apt-get install valgrind)")
    b = build("cpu")
    result = {
        "machine": {**_machine(1, b, "cpu", 0), "valgrind": _valgrind_version() if runner is run_callgrind else None},
        "settings": {"tokens": list(tokens), "prompt": INSTR_PROMPT, "threads": 1, "formats": list(formats),
                     "jobs": jobs, "tool": "llama-completion", "counter": "callgrind Ir"},
        "target_overhead_pct": TARGET_OVERHEAD_PCT,
        "models": {name: _instructions_model(name, b, configs, tokens, repeat, jobs, runner) for name in models},
    }
    out = out or Path("report") / "bench-instructions.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(_instructions_summary(result), file=sys.stderr)
    return result


def _valgrind_version() -> str:
    return subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True).stdout.strip()


STATS_VOCABS = {"smollm2": 49_152, "gemma3": 262_144}
STATS_ROWS = 447  # the scored positions of one corpus chunk


def run_stats_bench(block_rows: Sequence[int] = (1, 2, 4, 16), threads: Sequence[int] = (1, 2),
                    repetitions: int = 5) -> dict:
    """Time harness.metrics.token_stats on one chunk's worth of random logits for each vocabulary
    size, block size and thread count: the median of `repetitions` calls, each setting's rows
    checked bit-identical to the first setting's (the blocking and threading must not change a bit)."""
    import numpy as np
    from harness.metrics import token_stats

    rng = np.random.default_rng(0)
    table = []
    for vocab_name, n_vocab in STATS_VOCABS.items():
        base = (rng.standard_normal((STATS_ROWS, n_vocab)) * 3).astype(np.float32)
        test = base + (rng.standard_normal((STATS_ROWS, n_vocab)) * 0.01).astype(np.float32)
        targets = rng.integers(0, n_vocab, STATS_ROWS)
        first = None
        for rows in block_rows:
            for n_threads in threads:
                times = []
                for _ in range(repetitions):
                    started = time.perf_counter()
                    stats = token_stats(base, test, targets, block_rows=rows, threads=n_threads)
                    times.append(time.perf_counter() - started)
                first = first or stats
                same = all(np.array_equal(getattr(first, f.name), getattr(stats, f.name)) for f in fields(stats))
                table.append({"vocab": vocab_name, "n_vocab": n_vocab, "block_rows": rows, "threads": n_threads,
                              "median_s": statistics.median(times), "identical": same})
                progress(f"token_stats {vocab_name} block_rows {rows} threads {n_threads}: "
                         f"{statistics.median(times):.3f} s{'' if same else ' BITS DIFFER'}")
    return {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "rows": STATS_ROWS,
            "repetitions": repetitions, "timings": table}


def run_skip_bench(models: Sequence[str] = ("smollm2-f32", "gemma3-f32"), points: int = 24,
                   out: Path | None = None) -> dict:
    """Atlas points per hour with and without layer skipping (harness.residuals), side by side: a
    sample of `points` points spread evenly over each model's whole atlas plan (its mix of single
    layers, every layer at once and the positions of no layer), each measured both ways in turn
    (the order alternating per point), on the same session. The records must be identical, timing
    aside; the residuals' capture (once per model) and disk are reported apart."""
    from harness.atlas import ModelAtlas, measure_point
    from harness.build import build
    from harness.runner import ModelSession

    if points < 1:
        raise HarnessError(f"--points {points}: give at least 1 point per model")
    b = build("cpu")
    rows = []
    for name in models:
        session = ModelSession(name, b)
        try:
            atlas = ModelAtlas.of(session)
            plan = atlas.plan(None, None, None)
            sample = plan[::max(1, len(plan) // points)][:points]
            session.baseline  # noqa: B018 - made (or found) before any clock starts
            started = time.perf_counter()
            session.residuals.ensure(atlas.max_chunks)
            capture_s = time.perf_counter() - started
            wall = {True: 0.0, False: 0.0}
            inside = {True: 0.0, False: 0.0}
            identical = True
            for k, point in enumerate(sample):
                records = {}
                for skip in ((True, False) if k % 2 == 0 else (False, True)):
                    session.skip_layers = skip
                    before, t0 = session.compute_seconds, time.perf_counter()
                    records[skip] = measure_point(session, point, atlas.ne0[point.position], atlas.max_chunks)
                    wall[skip] += time.perf_counter() - t0
                    inside[skip] += session.compute_seconds - before
                same = {k2: v for k2, v in records[True].items() if k2 != "timing"} == \
                       {k2: v for k2, v in records[False].items() if k2 != "timing"}
                identical &= same
                progress(f"{name}: skip bench {k + 1}/{len(sample)} {point.slug}{'' if same else ' RECORDS DIFFER'}")
            rows.append({"model": name, "n_layer": session.model.n_layer, "plan_points": len(plan),
                         "sample_points": len(sample), "identical": identical,
                         "points_per_hour": {"skip": 3600 * len(sample) / wall[True],
                                             "whole": 3600 * len(sample) / wall[False]},
                         "speedup": wall[False] / wall[True],
                         "share_in_llama_decode": {"skip": inside[True] / wall[True],
                                                   "whole": inside[False] / wall[False]},
                         "refused": sorted(f"{layer}:{','.join(t)}" for layer, t in session.refused_starts),
                         "residuals": {"chunks": atlas.max_chunks, "capture_s": capture_s,
                                       "disk_bytes": session.residuals.disk_bytes()}})
            progress(f"{name}: {rows[-1]['speedup']:.2f}x points per hour with skipping")
        finally:
            session.close()
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "build": b.fingerprint["key"],
              "models": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _pick(given: int | None, default: int) -> int:
    return default if given is None else given


def _main_instructions(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    timing = {"--pp": args.pp, "--tg": args.tg, "--reps": args.reps, "--threads": args.threads,
              "--backend": args.backend, "--gpu-layers": args.gpu_layers, "--quick": args.quick or None,
              "--token-stats": args.token_stats or None}
    if given := [flag for flag, value in timing.items() if value is not None]:
        p.error(f"{', '.join(given)} do not apply to --instructions (one thread on the CPU build; "
                "its options: --models, --formats, --tokens, --jobs, --out)")
    out = args.out or Path("report") / "bench-instructions.json"
    try:
        run_instructions(args.models.split(",") if args.models else ["smollm2-q4_1"], args.formats,
                         tokens=args.tokens or INSTR_TOKENS, jobs=args.jobs, out=out)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main_bench(argv: list[str] | None = None) -> int:
    """`python -m harness bench`: the last stdout line is the JSON's path."""
    p = argparse.ArgumentParser(prog="python -m harness bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated model names (default smollm2-f32,smollm2-q4_1)")
    p.add_argument("--pp", type=int, help="prompt tokens (default 512)")
    p.add_argument("--tg", type=int, help="generated tokens (default 128)")
    p.add_argument("--reps", type=int, help="counted rounds (default 5)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default $FQ_THREADS or all cores)")
    p.add_argument("--out", type=Path, help="JSON output (default report/bench.json)")
    p.add_argument("--quick", action="store_true", help="smoke settings: smollm2-q4_1, pp 64, tg 8, 2 rounds")
    p.add_argument("--backend", choices=sorted(DEVICE_BUFFER),
                   help="build to run: cpu (default, or $FQ_BACKEND), or vulkan/cuda with every layer offloaded")
    p.add_argument("--gpu-layers", type=int,
                   help="layers offloaded to the GPU backend's device (default: every one, or $FQ_GPU_LAYERS)")
    p.add_argument("--formats", nargs="+", default=[],
                   help="also time ffn_norm at every layer in these formats (harness.formats; e.g. fp8_e4m3 mxfp4)")
    p.add_argument("--no-suite", action="store_true",
                   help="do not read the suite's time share from the last results file (needs no statistics packages)")
    p.add_argument("--token-stats", action="store_true",
                   help="only time the token statistics (harness.metrics) per block size and thread count")
    p.add_argument("--instructions", action="store_true",
                   help="instead: callgrind instruction counts per generated token of off, ffn_norm bf16 and each "
                        "of --formats (llama-completion at one thread; model default smollm2-q4_1)")
    p.add_argument("--tokens", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="--instructions: generated tokens of the two runs per configuration (default 48 16)")
    p.add_argument("--jobs", type=int, default=1, help="--instructions: callgrind runs at once (default 1)")
    p.add_argument("--skip-layers", action="store_true",
                   help="instead: atlas points per hour with and without layer skipping (a sample of --points "
                        "points of each model's atlas; models default smollm2-f32,gemma3-f32)")
    p.add_argument("--points", type=int, help="--skip-layers: points sampled per model (default 24)")
    args = p.parse_args(argv)
    if args.skip_layers:
        others = {"--pp": args.pp, "--tg": args.tg, "--reps": args.reps, "--threads": args.threads,
                  "--backend": args.backend, "--gpu-layers": args.gpu_layers, "--quick": args.quick or None,
                  "--formats": args.formats or None, "--token-stats": args.token_stats or None,
                  "--instructions": args.instructions or None, "--tokens": args.tokens}
        if given := [flag for flag, value in others.items() if value is not None]:
            p.error(f"{', '.join(given)} do not apply to --skip-layers (the CPU build; its options: --models, "
                    "--points, --out)")
        out = args.out or Path("report") / "bench-skip-layers.json"
        try:
            result = run_skip_bench(args.models.split(",") if args.models else ("smollm2-f32", "gemma3-f32"),
                                    _pick(args.points, 24), out)
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(out)
        return 0 if all(row["identical"] for row in result["models"]) else 1
    if args.points is not None:
        p.error("--points applies to --skip-layers only")
    if args.instructions:
        return _main_instructions(p, args)
    if args.token_stats:
        out = args.out or Path("report") / "bench-token-stats.json"
        result = run_stats_bench(repetitions=_pick(args.reps, 5))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(out)
        return 0 if all(row["identical"] for row in result["timings"]) else 1
    quick = args.quick
    models = args.models.split(",") if args.models else (["smollm2-q4_1"] if quick else ["smollm2-f32", "smollm2-q4_1"])
    out = args.out or Path("report") / "bench.json"
    try:
        run_bench(models, pp_tokens=_pick(args.pp, 64 if quick else 512), tg_tokens=_pick(args.tg, 8 if quick else 128),
                  repetitions=_pick(args.reps, 2 if quick else 5), threads=args.threads, out=out,
                  backend=args.backend, gpu_layers=args.gpu_layers, formats=args.formats, suite=not args.no_suite)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
