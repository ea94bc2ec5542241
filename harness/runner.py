"""Run one group of the matrix on one model and measure it against that model's baseline.

The baseline (logits of the scored corpus positions and of the task prompts, and the generated
continuations) is computed once per (model, build, corpus, measurement version) and kept on disk; each group's
measurement is cached by everything that decides it, so xdist workers, reruns and the report
share one computation. Intervals and verdicts are computed later from the cached per-token
arrays (harness.intervals), so they are not part of what is cached here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from harness import matrix
from harness.build import Build
from harness.cache import KEY_FILE, cache_root, progress, publish
from harness.corpus import (GENERATION_PROMPTS, SEEDED_PROMPT, Corpus, arithmetic_tasks, cut_chunks, load_corpus,
                            text_tasks)
from harness.driver import Context, FakeQuantRule, Model, Start, StartRefused, devices
from harness.measurement import RESULTS_VERSION
from harness.metrics import TokenStats, generation_match, summarize, token_stats
from harness.models import GGUFInfo, ModelFile, get_model, model_info
from harness.numerics import layer_numerics
from harness.records import AnswerLogprob, Continuation, GroupRecord, Tasks, Timing
from harness.reference import Capture
from harness.residuals import Residuals, skipping_enabled, start_layer

NUMERICS_TOKENS = 128  # positions of chunk 0 whose per-layer tensors are compared
TOKEN_ARRAYS = ("kld", "top1", "nll_base", "nll_test", "dp")


@dataclass(frozen=True)
class Task:
    kind: str  # arithmetic | text
    tokens: tuple[int, ...]
    first: int  # index of the first continuation token


def make_tasks(model: Model, corpus: Corpus) -> list[Task]:
    """The H5 prompts tokenized: context and continuation must tokenize apart."""
    made = []
    for kind, pairs in (("arithmetic", arithmetic_tasks()), ("text", text_tasks(corpus))):
        for context, continuation in pairs:
            head = model.tokenize(context)
            full = model.tokenize(context + continuation)
            if full[:len(head)] != head or len(full) == len(head):
                raise ValueError(f"continuation {continuation!r} does not tokenize apart from {context!r}")
            made.append(Task(kind, tuple(full), len(head)))
    return made


def tag(key: dict) -> str:
    """16 hex digits of the sha256 of a cache key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def entry_name(name: str, key: dict, part: str = "") -> str:
    """A cache entry's directory name: the model's label, `part`, and the tag of `key`. The label
    (matrix.model_label: a file's stem for a model given as a path) keeps the entry in the cache,
    where a path would place it beside the model file; two files of one name differ in their
    sha256, which is in every key."""
    return "-".join(x for x in (matrix.model_label(name), part, tag(key)) if x)


class BaselineFiles:
    """The files of a baseline entry, named here only: logits of each chunk's scored positions
    (`chunkNN.npy`) and of each task prompt (`taskNNN.npy`), the generated continuations and the
    numerics' captured tensors."""

    GENERATION = "generation.json"
    NUMERICS = "numerics.npz"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def chunk_path(self, i: int) -> Path:
        return self.directory / f"chunk{i:02d}.npy"

    def task_path(self, i: int) -> Path:
        return self.directory / f"task{i:03d}.npy"

    def chunk(self, i: int) -> np.ndarray:
        return np.load(self.chunk_path(i), mmap_mode="r")

    def task(self, i: int) -> np.ndarray:
        return np.load(self.task_path(i), mmap_mode="r")

    def generation(self) -> dict[str, list[int]]:
        """Generation id -> the baseline's token ids."""
        return json.loads((self.directory / self.GENERATION).read_text())

    def tensors(self) -> dict[str, np.ndarray]:
        with np.load(self.directory / self.NUMERICS) as data:
            return {name: data[name] for name in data.files}

    def write_generation(self, generation: dict[str, list[int]]) -> None:
        (self.directory / self.GENERATION).write_text(json.dumps(generation))

    def write_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        np.savez(self.directory / self.NUMERICS, **tensors)


class Contexts:
    """A model's three contexts: scoring (the corpus chunks and task prompts), capture (the numerics'
    tensors through a hook) and generation (every continuation in one batch, each in its own KV
    stream: Context.generate_many)."""

    def __init__(self, model: Model, longest_prompt: int, sequences: int) -> None:
        self.scoring: Context = model.context(matrix.N_CTX)
        self.capture = Capture(r"(ffn_out|l_out)-\d+|ffn_norm-\d+(\.fq)?")
        self.capturing: Context = model.context(NUMERICS_TOKENS, tensor_hook=self.capture)
        self.generation: Context = model.context(longest_prompt + matrix.GENERATION_TOKENS, sequences=sequences)

    def all(self) -> tuple[Context, ...]:
        return self.scoring, self.capturing, self.generation

    def set_fake_quant(self, rules: list) -> None:
        """The rules on the contexts a group measures with (the capture's are set per capture)."""
        self.scoring.set_fake_quant(rules)
        self.generation.set_fake_quant(rules)

    @property
    def compute_seconds(self) -> float:
        """Wall time spent inside llama_decode by these contexts."""
        return sum(c.compute_seconds for c in self.all())

    def close(self) -> None:
        for c in self.all():
            c.close()


class ModelSession:
    """One model in this process: its contexts, inputs and on-disk baseline; `run` measures
    (or loads) one group. With a GPU build, `gpu_layers` layers run on its device (the contexts
    are then renewed when their rules change: harness.driver.Context.set_fake_quant)."""

    def __init__(self, name: str, build: Build, corpus: Corpus | None = None, gpu_layers: int = 0) -> None:
        self.name = name
        self.build = build
        self.gpu_layers = gpu_layers
        self.file: ModelFile = get_model(name, build)
        self.info: GGUFInfo = model_info(self.file)
        self.model = Model(self.file.path, build, n_gpu_layers=gpu_layers)
        self.backend = {"name": build.backend, "gpu_layers": gpu_layers,
                        "devices": [asdict(d) for d in devices(build)]}
        expected = matrix.MODELS.get(name)
        if expected is not None and expected != self.model.n_layer:
            raise ValueError(f"{name}: the matrix expects {expected} layers, the model has {self.model.n_layer}")
        self.corpus = corpus or load_corpus()
        longest = max(len(self.model.tokenize(text)) for _, _, text in (*GENERATION_PROMPTS, SEEDED_PROMPT))
        self.contexts = Contexts(self.model, longest, sequences=len(GENERATION_PROMPTS) + 1)
        self.groups = {g.id: g for g in matrix.groups(self.model.n_layer)}
        self.skip_layers = skipping_enabled()  # harness.residuals
        self.refused_starts: set[tuple[int, tuple[str, ...]]] = set()

    @property
    def ctx(self) -> Context:
        """The scoring context (the atlas and the cross-check score with it too)."""
        return self.contexts.scoring

    @cached_property
    def key(self) -> dict[str, str]:
        key = {"model": self.file.sha256, "build": self.build.fingerprint["key"], "corpus": self.corpus.sha256,
               "measurement": str(RESULTS_VERSION), "n_ctx": str(matrix.N_CTX), "scored_from": str(matrix.SCORED_FROM),
               "main_chunks": str(matrix.MAIN_CHUNKS), "numerics_tokens": str(NUMERICS_TOKENS),
               "generation": f"{matrix.GENERATION_TOKENS}/{matrix.SEED}"}
        if self.gpu_layers:  # the build key names the backend; the offload decides which layers run there
            key["gpu_layers"] = str(self.gpu_layers)
        return key

    @cached_property
    def chunks(self) -> list[list[int]]:
        return cut_chunks(self.model.tokenize(self.corpus.text), matrix.N_CTX, matrix.MAIN_CHUNKS, self.model.bos)

    @cached_property
    def tasks(self) -> list[Task]:
        return make_tasks(self.model, self.corpus)

    def entry_name(self, key: dict, part: str = "") -> str:
        return entry_name(self.name, key, part)

    # baseline -------------------------------------------------------------------------------

    @cached_property
    def baseline(self) -> BaselineFiles:
        """Logits of every scored position and task, the generated continuations and the
        numerics' per-layer tensors, with no fake quantization."""
        def make(tmp: Path) -> None:
            self.contexts.set_fake_quant([])
            files = BaselineFiles(tmp)
            for i, chunk in enumerate(self.chunks):
                progress(f"{self.name}: baseline chunk {i + 1}/{len(self.chunks)}")
                np.save(files.chunk_path(i), self._scored_logits(chunk))
            progress(f"{self.name}: baseline of {len(self.tasks)} task prompts")
            for i, task in enumerate(self.tasks):
                np.save(files.task_path(i), self._task_logits(task))
            files.write_generation({g["id"]: g["tokens"] for g in self._generate()})
            files.write_tensors(self._capture([]))
            (tmp / KEY_FILE).write_text(json.dumps(self.key, indent=1))

        return BaselineFiles(publish(cache_root() / "baselines" / self.entry_name(self.key), make))

    def _scored_logits(self, chunk: list[int], copy: bool = True, start: Start | None = None) -> np.ndarray:
        """Logits of the scored positions SCORED_FROM..N_CTX-2 (each predicts the next token)."""
        return self.ctx.logits(chunk, first=matrix.SCORED_FROM, copy=copy, start=start)[:-1]

    # starting at a layer (harness.residuals) -----------------------------------------------

    @cached_property
    def residuals(self) -> Residuals:
        return Residuals(self)

    def start_layer(self, rules: Sequence[FakeQuantRule]) -> int:
        """Where the scoring decodes of `rules` start (0: the whole graph): their first layer, unless
        skipping is off, the build has a GPU backend (refused there) or libllama refused it before."""
        if not self.skip_layers or self.build.backend != "cpu":
            return 0
        first = start_layer(rules, self.model.n_layer)
        return 0 if (first, tuple(r.target for r in rules)) in self.refused_starts else first

    def start(self, i: int, layer: int) -> Start | None:
        """Chunk i's scoring decode from `layer` (None: the whole graph)."""
        return self.residuals.start(i, layer) if layer else None

    def refuse_start(self, layer: int, rules: Sequence[FakeQuantRule], exc: StartRefused) -> None:
        """Remember (and say once) that libllama would not start `rules` at `layer`."""
        self.refused_starts.add((layer, tuple(r.target for r in rules)))
        progress(f"{self.name}: {', '.join(r.target for r in rules)} from layer {layer} computes every layer: {exc}")

    def token_stats(self, base: np.ndarray, test: np.ndarray, targets: np.ndarray) -> TokenStats:
        """harness.metrics.token_stats on as many threads as llama.cpp gets: the cores idle
        between two decodes (the bits do not depend on the thread count)."""
        return token_stats(base, test, targets, threads=self.ctx.threads)

    def _task_logits(self, task: Task, copy: bool = True) -> np.ndarray:
        """Logits of the positions that predict the task's continuation tokens (copy=False: a view,
        valid until the next decode)."""
        return self.ctx.logits(task.tokens, first=task.first - 1, copy=copy)[:-1]

    # one group ------------------------------------------------------------------------------

    def result_key(self, group_id: str) -> dict[str, str]:
        return dict(self.key, group=self.groups[group_id].key())

    def result_dir(self, group_id: str) -> Path:
        return cache_root() / "results" / self.entry_name(self.result_key(group_id), group_id)

    def run(self, group_id: str) -> tuple[dict, dict[str, np.ndarray]]:
        """The group's record and per-token arrays, measured once and published atomically
        (another worker measuring the same group makes this one wait for it)."""
        def make(tmp: Path) -> None:
            record, arrays = self._measure(self.groups[group_id])
            np.savez(tmp / "arrays.npz", **arrays)
            (tmp / "record.json").write_text(json.dumps(record.to_json(), indent=1, ensure_ascii=False))
            (tmp / KEY_FILE).write_text(json.dumps(self.result_key(group_id), indent=1))

        final = publish(self.result_dir(group_id), make)
        with np.load(final / "arrays.npz") as data:
            arrays = {k: data[k] for k in data.files}
        return json.loads((final / "record.json").read_text()), arrays

    def _measure(self, group: matrix.Group) -> tuple[GroupRecord, dict[str, np.ndarray]]:
        baseline = self.baseline  # before the clock starts: it is shared by every group
        started = time.perf_counter()
        compute_before = self.compute_seconds
        self.contexts.set_fake_quant(list(group.rules))
        try:
            sites = 0
            parts = []
            for i, chunk in enumerate(self.chunks[:group.chunks]):
                progress(f"{self.name}: {group.id} chunk {i + 1}/{group.chunks}")
                test = self._scored_logits(chunk, copy=False)  # consumed before the next decode
                sites = self.ctx.fake_quant_sites
                base = baseline.chunk(i)
                parts.append(self.token_stats(base, test, np.asarray(chunk[matrix.SCORED_FROM + 1:])))
            stats = TokenStats.concat(parts)
            arrays = {name: getattr(stats, name) for name in TOKEN_ARRAYS}
            tasks = generation = numerics = None
            if group.tasks:
                tasks, task_arrays = self._tasks(baseline)
                arrays.update(task_arrays)
            if group.generation:
                generation = self._generation(baseline)
            if group.numerics:
                numerics = layer_numerics(self.baseline_tensors, self._capture(list(group.rules)), self.model.n_layer)
        finally:
            self.contexts.set_fake_quant([])
        wall = time.perf_counter() - started
        compute = self.compute_seconds - compute_before
        record = GroupRecord(group.id, self.name, group.kind, group.description, tuple(group.rules), group.layer,
                             group.scale, sites, summarize(stats), tasks, generation, numerics,
                             Timing(round(wall, 3), round(compute, 3)))
        return record, arrays

    def _tasks(self, baseline: BaselineFiles) -> tuple[Tasks, dict[str, np.ndarray]]:
        """Token statistics per kind of prompt, and per prompt its mean KLD and (arithmetic)
        the change of the answer's log-probability: the arrays H5 and the report's intervals use."""
        per_kind: dict[str, list[TokenStats]] = {"arithmetic": [], "text": []}
        for i, task in enumerate(self.tasks):
            base = baseline.task(i)
            stats = self.token_stats(base, self._task_logits(task, copy=False), np.asarray(task.tokens[task.first:]))
            per_kind[task.kind].append(stats)
        arrays = {f"task_kld_{kind}": np.array([s.kld.mean() for s in parts]) for kind, parts in per_kind.items()}
        base_lp = np.array([-s.nll_base.sum() for s in per_kind["arithmetic"]])
        test_lp = np.array([-s.nll_test.sum() for s in per_kind["arithmetic"]])
        arrays["answer_logprob_delta"] = test_lp - base_lp
        summary = {kind: summarize(TokenStats.concat(parts)) for kind, parts in per_kind.items()}
        return Tasks(summary["arithmetic"], summary["text"],
                     AnswerLogprob(float(base_lp.mean()), float(test_lp.mean()))), arrays

    def _generate(self) -> list[dict]:
        """Greedy continuations of the fixed prompts and the design's seeded scenario."""
        cases = [(p, None) for p in GENERATION_PROMPTS] + [(SEEDED_PROMPT, matrix.SEED)]
        prompts = [self.model.tokenize(prompt) for (_, _, prompt), _ in cases]
        continuations = self.contexts.generation.generate_many(prompts, matrix.GENERATION_TOKENS,
                                                               [seed for _, seed in cases])
        return [{"id": pid, "kind": kind, "sampling": "greedy" if seed is None else f"seed {seed}",
                 "prompt": prompt, "tokens": tokens, "text": self.model.detokenize(tokens)}
                for ((pid, kind, prompt), seed), tokens in zip(cases, continuations, strict=True)]

    def _generation(self, baseline: BaselineFiles) -> tuple[Continuation, ...]:
        """This group's continuations, each compared with the baseline's (recorded when the
        baseline was made, so the baseline group's own run is a real comparison too)."""
        reference = baseline.generation()
        return tuple(Continuation(**g, **generation_match(reference[g["id"]], g["tokens"])) for g in self._generate())

    @cached_property
    def baseline_tensors(self) -> dict[str, np.ndarray]:
        """ffn_out-N and l_out-N without fake quantization (the numerics' reference)."""
        return self.baseline.tensors()

    def _capture(self, rules: list) -> dict[str, np.ndarray]:
        capture, ctx = self.contexts.capture, self.contexts.capturing
        capture.tensors.clear()
        ctx.set_fake_quant(rules)
        try:
            ctx.logits(self.chunks[0][:NUMERICS_TOKENS])
        finally:
            ctx.set_fake_quant([])
        return dict(capture.tensors)

    @property
    def compute_seconds(self) -> float:
        """Wall time spent inside llama_decode by this session's contexts."""
        return self.contexts.compute_seconds

    def close(self) -> None:
        if "residuals" in self.__dict__:
            self.residuals.close()
        self.contexts.close()
        self.model.close()
