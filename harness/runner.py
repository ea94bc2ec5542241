"""Run one group of the matrix on one model and measure it against that model's baseline.

The baseline (logits of the scored corpus positions and of the task prompts) is computed once
per (model, build, corpus) and kept on disk; each group's results are cached by everything that
decides them, so xdist workers, reruns and the report share one computation.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from harness import matrix
from harness.build import Build
from harness.cache import cache_root, locked, progress, publish
from harness.corpus import GENERATION_PROMPTS, SEEDED_PROMPT, Corpus, arithmetic_tasks, load_corpus, text_tasks
from harness.driver import Context, Model
from harness.metrics import TokenStats, generation_match, mean_ci, summarize, token_stats
from harness.models import ModelFile, get_model
from harness.reference import Capture

NUMERICS_TOKENS = 128  # positions of chunk 0 whose per-layer tensors are compared
HIST_BINS = 80
TOKEN_ARRAYS = ("kld", "top1", "nll_base", "nll_test", "dp")


def _code_version() -> str:
    """Results depend on the code that computes them too: hash those sources (the group
    definitions and matrix constants enter the key as values)."""
    digest = hashlib.sha256()
    for name in ("runner.py", "metrics.py", "corpus.py", "driver.py"):
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Task:
    kind: str  # arithmetic | text
    tokens: tuple[int, ...]
    first: int  # index of the first continuation token


class ModelSession:
    """One model in this process: contexts, corpus chunks, tasks and the on-disk baseline."""

    def __init__(self, name: str, build: Build, corpus: Corpus | None = None) -> None:
        self.name = name
        self.build = build
        self.file: ModelFile = get_model(name, build)
        self.model = Model(self.file.path, build)
        expected = matrix.MODELS.get(name)
        if expected is not None and expected != self.model.n_layer:
            raise ValueError(f"{name}: the matrix expects {expected} layers, the model has {self.model.n_layer}")
        self.corpus = corpus or load_corpus()
        self.ctx: Context = self.model.context(matrix.N_CTX)
        self.capture = Capture(r"(ffn_out|l_out)-\d+|ffn_norm-\d+(\.raw)?")
        self.capture_ctx: Context = self.model.context(NUMERICS_TOKENS, tensor_hook=self.capture)
        self.groups = {g.id: g for g in matrix.groups(self.model.n_layer)}

    @cached_property
    def key(self) -> dict[str, str]:
        return {"model": self.file.sha256, "build": self.build.fingerprint["key"], "corpus": self.corpus.sha256,
                "code": _code_version(), "n_ctx": str(matrix.N_CTX), "scored_from": str(matrix.SCORED_FROM),
                "main_chunks": str(matrix.MAIN_CHUNKS),
                "numerics_tokens": str(NUMERICS_TOKENS), "generation": f"{matrix.GENERATION_TOKENS}/{matrix.SEED}",
                "block": str(matrix.BOOTSTRAP_BLOCK)}

    @cached_property
    def chunks(self) -> list[list[int]]:
        """Corpus chunks as llama-perplexity makes them: the text tokenized once (with BOS),
        cut every N_CTX tokens, the first token of each chunk replaced by BOS."""
        tokens = self.model.tokenize(self.corpus.text)
        n = min(len(tokens) // matrix.N_CTX, matrix.MAIN_CHUNKS)
        if n < matrix.MAIN_CHUNKS:
            raise ValueError(f"corpus {self.corpus.name} gives {len(tokens)} tokens: need {matrix.MAIN_CHUNKS} "
                             f"chunks of {matrix.N_CTX}")
        bos = self.model.bos
        out = []
        for i in range(n):
            chunk = tokens[i * matrix.N_CTX:(i + 1) * matrix.N_CTX]
            if bos is not None:
                chunk[0] = bos
            out.append(chunk)
        return out

    @cached_property
    def tasks(self) -> list[Task]:
        made = []
        for kind, pairs in (("arithmetic", arithmetic_tasks()), ("text", text_tasks(self.corpus))):
            for context, continuation in pairs:
                head = self.model.tokenize(context)
                full = self.model.tokenize(context + continuation)
                if full[:len(head)] != head or len(full) == len(head):
                    raise ValueError(f"continuation {continuation!r} does not tokenize apart from {context!r}")
                made.append(Task(kind, tuple(full), len(head)))
        return made

    # baseline -------------------------------------------------------------------------------

    @cached_property
    def baseline_dir(self) -> Path:
        tag = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        final = cache_root() / "baselines" / f"{self.name}-{tag}"

        def make(tmp: Path) -> None:
            self.ctx.set_fake_quant([])
            for i, chunk in enumerate(self.chunks):
                progress(f"{self.name}: baseline chunk {i + 1}/{len(self.chunks)}")
                np.save(tmp / f"chunk{i:02d}.npy", self._scored_logits(chunk))
            for i, task in enumerate(self.tasks):
                np.save(tmp / f"task{i:02d}.npy", self.ctx.logits(task.tokens, first=task.first - 1)[:-1])

        return publish(final, make)

    def _scored_logits(self, chunk: list[int], copy: bool = True) -> np.ndarray:
        """Logits of the scored positions SCORED_FROM..N_CTX-2 (each predicts the next token)."""
        return self.ctx.logits(chunk, first=matrix.SCORED_FROM, copy=copy)[:-1]

    # one group ------------------------------------------------------------------------------

    def result_paths(self, group_id: str) -> tuple[Path, Path]:
        group = self.groups[group_id]
        key = dict(self.key, group=json.dumps(asdict(group), sort_keys=True))
        tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        base = cache_root() / "results" / f"{self.name}-{group_id}-{tag}"
        return base.with_suffix(".json"), base.with_suffix(".npz")

    def run(self, group_id: str) -> tuple[dict, dict[str, np.ndarray]]:
        """The group's results record and per-token arrays (cached on disk)."""
        json_path, npz_path = self.result_paths(group_id)
        baseline = None if group_id == "baseline" or json_path.exists() else self.run("baseline")[0]
        with locked(json_path):  # another worker may be measuring this very group: wait for it
            if not json_path.exists():
                record, arrays = self._measure(self.groups[group_id], baseline)
                tmp = npz_path.with_name(npz_path.stem + ".tmp.npz")
                np.savez(tmp, **arrays)
                tmp.replace(npz_path)
                tmp = json_path.with_name(json_path.name + ".tmp")
                tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False))
                tmp.replace(json_path)  # written last: its presence means the pair is complete
        with np.load(npz_path) as data:
            arrays = {k: data[k] for k in data.files}
        return json.loads(json_path.read_text()), arrays

    def _measure(self, group: matrix.Group, baseline: dict | None) -> tuple[dict, dict[str, np.ndarray]]:
        started = time.perf_counter()
        compute_before = self.ctx.compute_seconds + self.capture_ctx.compute_seconds
        base_dir = self.baseline_dir
        self.ctx.set_fake_quant(list(group.rules))
        sites = 0
        parts = []
        for i, chunk in enumerate(self.chunks[:group.chunks]):
            progress(f"{self.name}: {group.id} chunk {i + 1}/{group.chunks}")
            test = self._scored_logits(chunk, copy=False)  # consumed before the next decode
            sites = self.ctx.fake_quant_sites
            base = np.load(base_dir / f"chunk{i:02d}.npy", mmap_mode="r")
            parts.append(token_stats(base, test, np.asarray(chunk[matrix.SCORED_FROM + 1:])))
        stats = TokenStats.concat(parts)
        record = {
            "group": group.id, "model": self.name, "kind": group.kind, "description": group.description,
            "rules": [asdict(r) for r in group.rules], "layer": group.layer, "scale": group.scale,
            "fake_quant_sites": sites,
            "tokens": dict(summarize(stats), **self._cis(stats)),
        }
        arrays = {name: getattr(stats, name) for name in TOKEN_ARRAYS}
        if group.generation:
            record["tasks"], task_arrays = self._tasks(base_dir)
            arrays.update(task_arrays)
            record["generation"] = self._generation(baseline)
        if group.numerics:
            record["numerics"] = self._numerics(group)
        self.ctx.set_fake_quant([])
        wall = time.perf_counter() - started
        compute = self.ctx.compute_seconds + self.capture_ctx.compute_seconds - compute_before
        record["timing"] = {"wall_s": round(wall, 3), "compute_s": round(compute, 3)}
        return record, arrays

    @staticmethod
    def _cis(stats: TokenStats) -> dict[str, list[float]]:
        block = matrix.BOOTSTRAP_BLOCK
        return {
            "kld_ci": list(mean_ci(stats.kld, block=block)),
            "top1_ci": list(mean_ci(stats.top1.astype(np.float64), block=block)),
            "ln_ppl_ratio_ci": list(mean_ci(stats.nll_test - stats.nll_base, block=block)),
        }

    def _tasks(self, base_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
        per_kind: dict[str, list[TokenStats]] = {"arithmetic": [], "text": []}
        task_kld = {"arithmetic": [], "text": []}
        answer_delta = []
        for i, task in enumerate(self.tasks):
            test = self.ctx.logits(task.tokens, first=task.first - 1)[:-1]
            stats = token_stats(np.load(base_dir / f"task{i:02d}.npy"), test, np.asarray(task.tokens[task.first:]))
            per_kind[task.kind].append(stats)
            task_kld[task.kind].append(float(stats.kld.mean()))
            if task.kind == "arithmetic":
                answer_delta.append((-stats.nll_base.sum(), -stats.nll_test.sum()))
        record: dict = {}
        for kind, parts in per_kind.items():
            record[kind] = dict(summarize(TokenStats.concat(parts)), kld_ci=list(mean_ci(np.asarray(task_kld[kind]))))
        base_lp, test_lp = np.asarray(answer_delta).T
        record["answer_logprob"] = {"base_mean": float(base_lp.mean()), "test_mean": float(test_lp.mean()),
                                    "delta_ci": list(mean_ci(test_lp - base_lp))}
        return record, {f"task_kld_{k}": np.asarray(v) for k, v in task_kld.items()}

    def _generation(self, baseline: dict | None) -> list[dict]:
        base = {g["id"]: g["tokens"] for g in baseline["generation"]} if baseline else {}
        out = []
        for (pid, kind, prompt), seed in [(p, None) for p in GENERATION_PROMPTS] + [(SEEDED_PROMPT, matrix.SEED)]:
            tokens = self.ctx.generate(self.model.tokenize(prompt), matrix.GENERATION_TOKENS, seed=seed)
            match = generation_match(base.get(pid, tokens), tokens)
            out.append({"id": pid, "kind": kind, "sampling": "greedy" if seed is None else f"seed {seed}",
                        "prompt": prompt, "tokens": tokens, "text": self.model.detokenize(tokens), **match})
        return out

    @cached_property
    def baseline_tensors(self) -> dict[str, np.ndarray]:
        """ffn_out-N and l_out-N without fake quantization (the numerics' reference)."""
        return self._capture([])

    def _capture(self, rules: list) -> dict[str, np.ndarray]:
        self.capture.tensors.clear()
        self.capture_ctx.set_fake_quant(rules)
        try:
            self.capture_ctx.logits(self.chunks[0][:NUMERICS_TOKENS])
        finally:
            self.capture_ctx.set_fake_quant([])
        return dict(self.capture.tensors)

    def _numerics(self, group: matrix.Group) -> dict:
        """Per layer: how far ffn_out and l_out moved from the baseline, and what the rounding did
        to the ffn_norm activations of the fake-quantized layers."""
        ref = self.baseline_tensors
        got = self._capture(list(group.rules))
        n_layer = self.model.n_layer
        out: dict = {"layers": list(range(n_layer))}
        for name in ("ffn_out", "l_out"):
            rel, cos = [], []
            for il in range(n_layer):
                x = got[f"{name}-{il}"].astype(np.float64)
                x0 = ref[f"{name}-{il}"].astype(np.float64)
                rel.append(float(np.linalg.norm(x - x0) / np.linalg.norm(x0)))
                num = (x * x0).sum(axis=-1)
                cos.append(float(np.mean(num / (np.linalg.norm(x, axis=-1) * np.linalg.norm(x0, axis=-1)))))
            out[f"{name}_rel_err"], out[f"{name}_cos"] = rel, cos
        stats = {}
        hist_layers = {0, n_layer // 2, n_layer - 1}
        for il in range(n_layer):
            raw = got.get(f"ffn_norm-{il}.raw")
            if raw is None:
                continue
            rounded = got[f"ffn_norm-{il}"]
            mag = np.abs(raw.astype(np.float64))
            entry = {"changed_fraction": float(np.mean(raw != rounded)), "max_abs": float(mag.max()),
                     "p50_abs": float(np.percentile(mag, 50)), "p99_abs": float(np.percentile(mag, 99)),
                     "p99_9_abs": float(np.percentile(mag, 99.9)),
                     "max_rel_change": float(np.max(np.abs(rounded.astype(np.float64) - raw) / np.maximum(mag, 1e-30)))}
            if il in hist_layers:
                lo, hi = np.percentile(raw, [0.1, 99.9])
                edges = np.linspace(lo, hi, HIST_BINS + 1)
                entry["hist_edges"] = edges.tolist()
                entry["hist_raw"] = np.histogram(raw, edges)[0].tolist()
                entry["hist_rounded"] = np.histogram(rounded, edges)[0].tolist()
            stats[str(il)] = entry
        out["ffn_norm"] = stats
        return out

    def close(self) -> None:
        self.ctx.close()
        self.capture_ctx.close()
        self.model.close()
