"""The atlas's points as tasks on a Dask cluster: a local one (distributed.LocalCluster, N worker
processes) or any running one (`dask scheduler` with `dask worker`s, dask-jobqueue's SLURMCluster,
any Dask cluster manager). docs/distributed.md has the recipes and what was tested.

A point is one task: point_task, a pure function of (model and its sha256, build key, corpus,
measurement code, the point, the chunk plan) returning the point's record. It calls the serial
path's own measure_point on a ModelSession that the worker keeps for the next point of the same
model (AtlasWorker, a WorkerPlugin: worker-local state, closed at the worker's teardown). A worker
gets the build and the models as a user's node does, from its harness cache ($FQ_CACHE_DIR:
shared by the nodes or one per node), and refuses a task whose model file, build, corpus or
measurement code differ from what the client planned with, since its record would not be the
serial path's.

The client owns the point store (harness.atlas.PointStore, the serial path's, same key): it
publishes each record as it arrives (as_completed), so a killed client loses only the points in
flight and a rerun submits only the points not stored; a killed worker loses nothing, the
scheduler runs its task elsewhere (up to distributed.scheduler.allowed-failures times). The client
never loads a model: a worker describes it (describe_task -> ModelFacts), and the client plans.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

from harness import measurement
from harness.atlas import MAX_CHUNKS, ModelAtlas, ModelFacts, Point, eta_text, measure_point, measure_rules
from harness.build import build, fingerprint
from harness.cache import HarnessError, progress
from harness.corpus import Corpus, load_corpus
from harness.driver import FakeQuantRule
from harness.runner import ModelSession


def measurement_code() -> tuple[str, str]:
    """The fingerprints of this harness's measurement code (results, atlas): equal on client and workers."""
    return measurement.fingerprint("results"), measurement.fingerprint("atlas")


@dataclass(frozen=True)
class ModelSpec:
    """What decides a point's record besides the point and the chunk plan; a worker checks each
    against its own before it measures."""

    model: str                  # as the user named it: a shipped name, `user`, or a GGUF path the workers can read
    corpus_sha256: str          # the client's corpus ($FQ_CORPUS or the default)
    code: tuple[str, str]       # measurement_code() of the client's harness
    sha256: str | None = None   # the model file's; None until a worker has described the model
    build_key: str | None = None
    backend: str = "cpu"        # harness.build.offload: the build to run on and the layers on its device
    gpu_layers: int = 0

    @property
    def session_key(self) -> tuple:
        return self.model, self.corpus_sha256, self.code, self.backend, self.gpu_layers


def _refuse(what: str, worker: str, theirs: object, ours: object, fix: str) -> HarnessError:
    return HarnessError(f"worker {worker}: its {what} ({theirs}) differs from the client's ({ours}); {fix}")


def open_session(spec: ModelSpec, worker: str) -> ModelSession:
    """The ModelSession a user's node would open for `spec`: the same measurement code, build key
    (checked before a build starts) and corpus, or an error naming both."""
    code = measurement_code()
    if code != spec.code:
        def text(c: tuple[str, str]) -> str:
            return f"results {c[0]}, atlas {c[1]}"

        raise _refuse("harness measurement code", worker, text(code), text(spec.code),
                      "install the same harness on every worker")
    key = fingerprint(spec.backend)["key"]
    if spec.build_key is not None and key != spec.build_key:
        raise _refuse("build key", worker, key, spec.build_key,
                      "the compiler or the patch differs (harness.build.fingerprint)")
    corpus = load_corpus()
    if corpus.sha256 != spec.corpus_sha256:
        raise _refuse("corpus", worker, f"{corpus.name} {corpus.sha256[:12]}", spec.corpus_sha256[:12],
                      "set $FQ_CORPUS on the workers to the client's text")
    return ModelSession(spec.model, build(spec.backend), corpus, gpu_layers=spec.gpu_layers)


class AtlasWorker(WorkerPlugin):
    """A worker's ModelSession, kept for the next task of the same model (one model at a time);
    a lock lets one task at a time use it (a worker with several threads runs points one by one)."""

    name = "ffn-fake-quant-atlas"
    idempotent = True  # a second client's registration keeps the loaded session

    def setup(self, worker) -> None:
        self.address = worker.address
        self.lock = threading.Lock()
        self.session: ModelSession | None = None
        self.spec: ModelSpec | None = None
        self.current: str | None = None  # the slug of the point being measured, for observers
        self.opened = 0  # sessions opened by this worker: one per model while it keeps each

    def teardown(self, worker) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.spec = None

    @contextlib.contextmanager
    def session_for(self, spec: ModelSpec) -> Iterator[ModelSession]:
        with self.lock:
            if self.spec is None or self.spec.session_key != spec.session_key:
                self._close()
                self.session = open_session(spec, self.address)
                self.spec = spec
                self.opened += 1
            file = self.session.file
            if spec.sha256 is not None and file.sha256 != spec.sha256:
                raise _refuse(f"model file {file.path}", self.address, file.sha256[:12], spec.sha256[:12],
                              "give every worker the same file")
            key = self.session.build.fingerprint["key"]
            if spec.build_key is not None and key != spec.build_key:
                raise _refuse("build key", self.address, key, spec.build_key,
                              "the compiler or the patch differs (harness.build.fingerprint)")
            yield self.session


def _plugin() -> AtlasWorker:
    worker = get_worker()
    plugin = worker.plugins.get(AtlasWorker.name)
    if plugin is None:
        raise HarnessError(f"worker {worker.address} has no {AtlasWorker.name} plugin: connect with "
                           "harness.atlas_cluster.connect, which registers it")
    return plugin


def describe_task(spec: ModelSpec) -> ModelFacts:
    with _plugin().session_for(spec) as session:
        return ModelFacts.of(session)


def point_task(spec: ModelSpec, point: Point, ne0: int, max_chunks: int) -> dict:
    """The point's record: harness.atlas.measure_point on the worker's session."""
    plugin = _plugin()
    with plugin.session_for(spec) as session:
        plugin.current = point.slug
        try:
            return measure_point(session, point, ne0, max_chunks)
        finally:
            plugin.current = None


def rules_task(spec: ModelSpec, rules: list[FakeQuantRule], max_chunks: int) -> dict:
    with _plugin().session_for(spec) as session:
        return measure_rules(session, rules, max_chunks).to_json()


class ClusterAtlas(ModelAtlas):
    """A ModelAtlas whose points are tasks on the client's cluster; the records go into the store here."""

    def __init__(self, client: Client, spec: ModelSpec, facts: ModelFacts, max_chunks: int = MAX_CHUNKS,
                 root: Path | None = None) -> None:
        super().__init__(facts, max_chunks, root)
        self.client = client
        self.spec = spec
        self.measured_compute = 0.0  # llama_decode seconds of the records measured by this client, on any worker

    @classmethod
    def open(cls, client: Client, model: str, corpus: Corpus | None = None, max_chunks: int = MAX_CHUNKS,
             root: Path | None = None, build_key: str | None = None, backend: str = "cpu",
             gpu_layers: int = 0) -> ClusterAtlas:
        """A worker describes `model` (and keeps it loaded); its sha256 and build key then pin every task."""
        corpus = corpus or load_corpus()
        spec = ModelSpec(model, corpus.sha256, measurement_code(), build_key=build_key, backend=backend,
                         gpu_layers=gpu_layers)
        progress(f"{model}: a worker describes the model (on a fresh cache it builds, derives or downloads first)")
        facts = client.submit(describe_task, spec, pure=False).result()
        return cls(client, replace(spec, sha256=facts.sha256, build_key=facts.build["key"]), facts, max_chunks, root)

    def task_key(self, point: Point) -> str:
        """One key per (store, point): clients asking for the same point share its task."""
        return f"atlas-{self.store.directory.name}-{point.slug}"

    def run(self, points: Sequence[Point]) -> tuple[list[dict], int]:
        """Every point's record (read from the store, or measured on the cluster and published as
        it arrives) and how many were measured now; progress (done / total, rate, ETA) on stderr."""
        label = f"{self.facts.name} atlas"
        todo = [p for p in points if not self.store.has(p)]
        workers = len(self.client.scheduler_info(n_workers=-1)["workers"])
        progress(f"{label}: {len(points)} points, {len(points) - len(todo)} in the store, {len(todo)} to measure "
                 f"on the cluster ({workers} worker{'s' * (workers != 1)} now)")
        futures = {self.client.submit(point_task, self.spec, p, self.ne0[p.position], self.max_chunks,
                                      key=self.task_key(p)): p for p in todo}
        started, done, measured = time.perf_counter(), len(points) - len(todo), 0
        try:
            for future in as_completed(futures):
                point = futures.pop(future)
                record = self.store.put(point, future.result())
                done, measured = done + 1, measured + 1
                self.measured_compute += record.get("timing", {}).get("compute_s", 0.0)
                elapsed = time.perf_counter() - started
                progress(f"{label}: {done}/{len(points)} points, {point.slug} measured; "
                         f"{measured / elapsed * 60:.1f} points/min, {eta_text(elapsed, measured, len(futures))}")
        finally:
            if futures:  # after an error or an interrupt: the tasks still pending or running
                self.client.cancel(list(futures))
        return [self.store.get(p, self._missing)[0] for p in points], measured

    @staticmethod
    def _missing(point: Point) -> dict:
        raise HarnessError(f"point {point.slug} is neither stored nor measured")

    def measure_set(self, rules: Sequence[FakeQuantRule]) -> dict:
        record = self.client.submit(rules_task, self.spec, list(rules), self.max_chunks, pure=False).result()
        self.measured_compute += record["timing"]["compute_s"]
        return record

    def compute_seconds(self) -> float:
        return self.measured_compute


def local_threads(workers: int) -> int:
    """llama.cpp threads per worker of a local cluster: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // workers)


@contextlib.contextmanager
def connect(workers: int | None = None, scheduler: str | None = None) -> Iterator[Client]:
    """A client of a new local cluster of `workers` processes (one Dask thread each, llama.cpp
    threads local_threads(workers)) or of the running scheduler at `scheduler`, with AtlasWorker
    registered on every worker, present and future; the dashboard's address on stderr.

    memory_limit=0: the nanny's memory limit would count the model's memory-mapped weights, shared
    by every worker of a node, in each worker's memory, and restart workers that hold a large model."""
    if (workers is None) == (scheduler is None):
        raise HarnessError("give either a number of local workers or a scheduler address")
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler))  # dask's distributed.comm.timeouts.connect
            except OSError as exc:
                raise HarnessError(f"no Dask scheduler reachable at {scheduler!r}: {exc}") from None
            where = f"the scheduler at {scheduler}"
        else:
            if workers < 1:
                raise HarnessError(f"{workers} local workers: give at least 1")
            threads = local_threads(workers)
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       memory_limit=0, env={"FQ_THREADS": str(threads)}))
            client = stack.enter_context(Client(cluster))
            where = f"a local cluster of {workers} worker processes, {threads} llama.cpp thread(s) each"
        client.register_plugin(AtlasWorker())
        progress(f"Dask: {where}; dashboard {dashboard(client)}")
        yield client


def dashboard(client: Client) -> str:
    try:
        return client.dashboard_link
    except (KeyError, TypeError):
        return "none (the scheduler runs no dashboard)"


def slurm_cluster(cores: int, workers: int, memory: str, walltime: str, cache_dir: str | None = None, **kwargs):
    """dask-jobqueue's SLURMCluster for the atlas (pip install dask-jobqueue): each job books `cores`
    CPUs and `memory` and runs `workers` worker processes with one Dask thread and cores // workers
    llama.cpp threads each ($FQ_THREADS), no nanny memory limit (see connect), and the harness cache
    at `cache_dir` ($FQ_CACHE_DIR; None: each node's default). Other keyword arguments (queue,
    account, job_extra_directives, python, ...) go to SLURMCluster; scale it with .scale(jobs=N)
    and pass its scheduler_address to --scheduler (docs/distributed.md)."""
    from dask_jobqueue import SLURMCluster

    if not 1 <= workers <= cores:
        raise HarnessError(f"{workers} workers on {cores} cores a job: give 1 to {cores} workers")
    prologue = [f"export FQ_THREADS={cores // workers}"]
    if cache_dir is not None:
        prologue.append(f"export FQ_CACHE_DIR={shlex.quote(cache_dir)}")
    return SLURMCluster(cores=workers, processes=workers, job_cpu=cores, memory=memory, walltime=walltime,
                        job_script_prologue=prologue + list(kwargs.pop("job_script_prologue", [])),
                        worker_extra_args=["--memory-limit", "0", *kwargs.pop("worker_extra_args", [])], **kwargs)
