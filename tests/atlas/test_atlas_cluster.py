"""The atlas's points as Dask tasks (harness.atlas_cluster) on SmolLM2-135M F32: every record a
cluster measures is the serial path's, bit for bit (the `timing` field, wall and llama_decode
seconds, is the only one left out), with a local cluster of 2 workers, with a worker killed in the
middle of a point, with the client killed and restarted, and with a scheduler and a worker started
apart (`dask scheduler`, `dask worker`), where the advisor runs too.

The serial records are measured here, in this process, into a store of this session (shared by
xdist workers), with the same 13 points as every cluster run: attn_norm and ffn_norm at layers 0
and 29 and at every layer, bf16 and f16, and the reference; at most 2 chunks a point, so that a
point measured over two chunks (attn_norm f16 at layer 0) is among them. The runs that kill a
process measure the 7 points of ffn_norm, to stay short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

import harness
from harness.atlas import ModelAtlas, advise_atlas, measure_atlas
from harness.atlas_cluster import AtlasWorker, ClusterAtlas, ModelSpec, connect, local_threads, measurement_code
from harness.cache import HarnessError, cache_root
from harness.corpus import load_corpus

pytestmark = pytest.mark.native

MODEL = "smollm2-f32"
POSITIONS = ["attn_norm", "ffn_norm"]
LAYERS = "0,29"
FORMATS = ["bf16", "f16"]
KILLED = ["ffn_norm"]  # the positions of the runs that kill a process: 7 points
CHUNKS = 2
REPO = Path(harness.__file__).resolve().parent.parent
DASK = Path(sys.executable).with_name("dask")
TIMING = "timing"  # the record's only timing field: {"wall_s", "compute_s"}


@pytest.fixture(scope="module")
def session(build):
    from harness.runner import ModelSession

    s = ModelSession(MODEL, build)
    yield s
    s.close()


@pytest.fixture(scope="module")
def serial(session, tmp_path_factory, worker_id) -> SimpleNamespace:
    """The serial path's atlas and records of the points; one store per pytest session (xdist
    workers share it, each point measured once, in-process)."""
    base = tmp_path_factory.getbasetemp()
    atlas = ModelAtlas.of(session, CHUNKS, (base if worker_id == "master" else base.parent) / "serial-atlas")
    points = atlas.plan(POSITIONS, LAYERS, FORMATS)
    records, _ = atlas.run(points)
    return SimpleNamespace(atlas=atlas, points=points, records={p: r for p, r in zip(points, records, strict=True)})


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != TIMING}


def assert_serial_records(store, serial, points=None) -> None:
    """Every point's stored record is the serial one, timing aside; both were measured (timing present)."""
    points = serial.points if points is None else points
    assert store.directory.name == serial.atlas.store.directory.name  # the same store key
    for point in points:
        got = json.loads(store.path(point).read_text())
        assert TIMING in got and TIMING in serial.records[point], point
        assert without_timing(got) == without_timing(serial.records[point]), point


def test_the_serial_run_has_points_of_one_and_two_chunks(serial):
    assert len(serial.points) == 13
    assert {r["chunks"] for r in serial.records.values()} == {1, 2}


@pytest.mark.cluster
def test_two_workers_give_the_serial_records(serial, tmp_path):
    with connect(workers=2) as client:
        assert set(client.run(lambda: os.environ["FQ_THREADS"]).values()) == {str(local_threads(2))}
        atlas = ClusterAtlas.open(client, MODEL, max_chunks=CHUNKS, root=tmp_path)
        assert atlas.facts == serial.atlas.facts  # a worker described the model the client never loaded
        part, measured = measure_atlas(atlas, POSITIONS, LAYERS, FORMATS)
        assert measured == len(serial.points)
        assert_serial_records(atlas.store, serial)
        # each worker measured points on the one session it opened (worker-local state)
        opened = client.run(lambda dask_worker: dask_worker.plugins[AtlasWorker.name].opened)
        assert sorted(opened.values()) == [1, 1], opened
        again, measured_again = measure_atlas(atlas, POSITIONS, LAYERS, FORMATS)
    assert measured_again == 0 and again["points"] == part["points"]
    assert [without_timing(r) for r in part["points"]] == [without_timing({k: v for k, v in serial.records[p].items()
                                                                          if k != "kld"}) for p in serial.points]


@pytest.mark.cluster
def test_a_worker_killed_in_the_middle_of_a_point_loses_nothing(serial, tmp_path):
    """SIGKILL to the worker process measuring a point, after at least two points were published:
    the scheduler reruns its task, the nanny starts a new worker, every record is the serial one."""
    with connect(workers=2) as client:
        atlas = ClusterAtlas.open(client, MODEL, max_chunks=CHUNKS, root=tmp_path)
        points = atlas.plan(KILLED, LAYERS, FORMATS)
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = measure_atlas(atlas, KILLED, LAYERS, FORMATS)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        def current(dask_worker) -> str | None:
            return dask_worker.plugins[AtlasWorker.name].current

        pids = client.run(os.getpid)
        thread = threading.Thread(target=run)
        thread.start()
        victim, deadline = None, time.monotonic() + 300
        while victim is None and thread.is_alive() and time.monotonic() < deadline:
            stored = sum(atlas.store.has(p) for p in points)
            busy = {a: slug for a, slug in client.run(current).items() if slug}
            if stored >= 2 and busy:
                address, slug = next(iter(busy.items()))
                time.sleep(0.3)  # into the point's decode
                if client.run(current, workers=[address]).get(address) == slug:
                    os.kill(pids[address], signal.SIGKILL)
                    victim = (pids[address], next(p for p in points if p.slug == slug))
            time.sleep(0.05)
        assert victim is not None, "no point was seen in progress"
        pid, point = victim
        assert not atlas.store.has(point)  # the point had not been published when its worker died
        thread.join(timeout=600)
        assert not thread.is_alive() and "error" not in outcome, outcome
        assert outcome["result"][1] == len(points) == 7
        assert pid not in client.run(os.getpid).values()
    assert_serial_records(atlas.store, serial, points)


def cache_without_points(tmp_path: Path) -> Path:
    """A harness cache sharing this one's builds, models and baselines (links) with no atlas point."""
    mine = tmp_path / "cache"
    mine.mkdir()
    for entry in cache_root().iterdir():
        if entry.is_dir() and entry.name != "atlas":
            (mine / entry.name).symlink_to(entry)
    return mine


@pytest.mark.cluster
def test_a_killed_client_resumes_without_remeasuring(serial, tmp_path):
    """`atlas --workers 2` killed (SIGKILL) after 3 of 7 points were published: its workers exit; the
    rerun submits only the other points, leaves the published files untouched, and every record is
    the serial one."""
    cache = cache_without_points(tmp_path)
    env = dict(os.environ, FQ_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "harness", "atlas", "--models", MODEL, "--positions", *KILLED, "--layers", LAYERS,
           "--formats", *FORMATS, "--max-chunks", str(CHUNKS), "--workers", "2", "--out", str(tmp_path / "out")]
    store = SimpleNamespace(directory=cache / "atlas" / serial.atlas.store.directory.name)
    store.path = lambda p: store.directory / p.slug / "point.json"
    points = serial.atlas.plan(KILLED, LAYERS, FORMATS)
    with open(tmp_path / "killed.log", "w") as log:
        client = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while sum(store.path(p).exists() for p in points) < 3 and time.monotonic() < deadline:
            assert client.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        processes = psutil.Process(client.pid).children(recursive=True)
        client.kill()
        client.wait()
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, f"processes of the killed client still running: {alive}"
    first = {p: store.path(p).stat() for p in points if store.path(p).exists()}
    assert 3 <= len(first) < len(points), (tmp_path / "killed.log").read_text()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    todo = len(points) - len(first)
    assert f"{len(points)} points, {len(first)} in the store, {todo} to measure" in rerun.stderr
    assert f"{MODEL}: {todo} points measured, {len(first)} from the cache" in rerun.stderr
    assert "dashboard http://" in rerun.stderr and "points/min" in rerun.stderr
    for point, before in first.items():
        after = store.path(point).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), point
    assert_serial_records(store, serial, points)


@pytest.mark.cluster
def test_a_scheduler_and_a_worker_started_apart(serial, tmp_path, monkeypatch, capsys):
    """`dask scheduler` and `dask worker` as a user starts them (the worker imports this tree's
    harness through PYTHONPATH, with 2 llama.cpp threads from FQ_THREADS): the same records, and
    the advisor's measured set is the serial path's too, from the library and from
    `advise --scheduler` (whose client has a cache of its own, without the points)."""
    from harness.__main__ import main
    from harness.report import with_ci

    file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), FQ_THREADS="2")
    logs = open(tmp_path / "dask.log", "w")  # noqa: SIM115 - closed in finally
    started = [subprocess.Popen([str(DASK), "scheduler", "--scheduler-file", str(file), "--port", "0",
                                 "--dashboard-address", ":0"], env=env, stdout=logs, stderr=subprocess.STDOUT)]
    try:
        started.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(file), "--nthreads", "1",
                                         "--memory-limit", "0"], env=env, stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        with connect(scheduler=address) as client:
            client.wait_for_workers(1, timeout=60)
            assert set(client.run(lambda: harness.__file__).values()) == {harness.__file__}
            atlas = ClusterAtlas.open(client, MODEL, max_chunks=CHUNKS, root=tmp_path / "store")
            points = atlas.plan(["ffn_norm"], LAYERS, ["bf16"])
            _, measured = measure_atlas(atlas, ["ffn_norm"], LAYERS, ["bf16"])
            assert measured == len(points) == 4
            assert_serial_records(atlas.store, serial, points)
            advice = advise_atlas(atlas, "bf16", 1e-3, ["ffn_norm"], LAYERS)
        expected = advise_atlas(serial.atlas, "bf16", 1e-3, ["ffn_norm"], LAYERS)
        assert advice.sites == (("ffn_norm", 0), ("ffn_norm", 29)) and advice.measured_now == 0
        assert replace(advice, measured=replace(advice.measured, timing=None)) == \
            replace(expected, measured=replace(expected.measured, timing=None))
        monkeypatch.setenv("FQ_CACHE_DIR", str(cache_without_points(tmp_path)))
        capsys.readouterr()
        assert main(["advise", "--model", MODEL, "--format", "bf16", "--budget", "1e-3", "--positions", "ffn_norm",
                     "--layers", LAYERS, "--max-chunks", str(CHUNKS), "--scheduler", address]) == 0
        out, err = capsys.readouterr()
        assert "2 of 2 sites fit" in out and "dashboard http://" in err
        assert f"measured KLD: {with_ci(expected.measured.kld_ci)}" in out
        assert "2 points, 0 in the store, 2 to measure on the cluster (1 worker now)" in err
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=60)
        logs.close()


def test_a_worker_refuses_another_model_file(build):
    """The client pinned another file's sha256 (another node's copy of `user`, say)."""
    plugin = AtlasWorker()
    plugin.setup(SimpleNamespace(address="tcp://w:1"))
    spec = ModelSpec(MODEL, load_corpus().sha256, measurement_code(), sha256="ab" * 32,
                     build_key=build.fingerprint["key"])
    try:
        with pytest.raises(HarnessError, match=r"^worker tcp://w:1: its model file \S+model.gguf \(\w{12}\) differs "
                                               r"from the client's \(abababababab\); give every worker the same file"):
            with plugin.session_for(spec):
                pass
    finally:
        plugin.teardown(None)


@pytest.mark.cluster
def test_cli_errors_with_a_cluster(tmp_path, capsys):
    """An unreachable scheduler, and an unknown model (raised on a worker), are errors naming the value."""
    import dask

    from harness.__main__ import main

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["atlas", "--models", MODEL, "--scheduler", "tcp://127.0.0.1:9", "--out", str(tmp_path)]) == 1
    assert "error: no Dask scheduler reachable at 'tcp://127.0.0.1:9': Timed out" in capsys.readouterr().err
    assert main(["advise", "--model", "tinyllama", "--format", "bf16", "--budget", "1e-5", "--workers", "1"]) == 1
    assert "error: unknown model 'tinyllama' (allowed: smollm2-q4_1" in capsys.readouterr().err
