"""The Dask side of the atlas without a model: a worker refuses a task planned with other
measurement code, another build or another corpus before it loads or builds anything; the Slurm
recipe's job script (built without Slurm); the CLI's cluster options. The cluster itself is tested
on SmolLM2 in tests/atlas/test_atlas_cluster.py."""

from __future__ import annotations

import pytest

from harness.atlas_cluster import ModelSpec, measurement_code, open_session, slurm_cluster
from harness.build import fingerprint
from harness.cache import HarnessError
from harness.corpus import load_corpus


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    """A spec this process's harness would accept (the model is never loaded here)."""
    return ModelSpec("smollm2-f32", load_corpus().sha256, measurement_code(), sha256="ab" * 32,
                     build_key=fingerprint()["key"])


@pytest.mark.parametrize(("change", "message"), [
    ({"code": ("0" * 16, "1" * 16)}, r"its harness measurement code \(results \w{16}, atlas \w{16}\) differs from "
                                     r"the client's \(results 0{16}, atlas 1{16}\); install the same harness"),
    ({"build_key": "f" * 16}, r"its build key \(\w{16}\) differs from the client's \(f{16}\); the compiler or "
                              "the patch"),
    ({"corpus_sha256": "c" * 64}, r"its corpus \(pydoc_data.topics \w{12}\) differs from the client's \(c{12}\); "
                                  r"set \$FQ_CORPUS on the workers"),
])
def test_a_worker_refuses_a_task_planned_with_something_else(spec, change, message):
    with pytest.raises(HarnessError, match=r"^worker tcp://w:1: " + message):
        open_session(ModelSpec(**{**spec.__dict__, **change}), "tcp://w:1")


def test_the_session_is_kept_across_the_pins():
    """A worker keeps its session when the client pins the sha256 and build key after describing."""
    a = ModelSpec("m", "c", ("r", "a"))
    assert a.session_key == ModelSpec("m", "c", ("r", "a"), sha256="s", build_key="k").session_key
    assert a.session_key != ModelSpec("n", "c", ("r", "a")).session_key


def test_slurm_job_script_without_slurm():
    """The recipe's job: 32 CPUs and 64 GB booked, 4 worker processes of one Dask thread and 8
    llama.cpp threads each, no nanny memory limit (the last --memory-limit wins), the shared cache."""
    cluster = slurm_cluster(cores=32, workers=4, memory="64GB", walltime="04:00:00", cache_dir="/shared/ffn cache",
                            queue="cpu", job_extra_directives=["--gres=gpu:0"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    lines = script.splitlines()
    for directive in ("#SBATCH -p cpu", "#SBATCH --cpus-per-task=32", "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:0"):
        assert directive in lines, script
    assert "export FQ_THREADS=8" in lines and "export FQ_CACHE_DIR='/shared/ffn cache'" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line).split()
    assert worker[worker.index("--nthreads") + 1] == "1" and worker[worker.index("--nworkers") + 1] == "4"
    limits = [worker[i + 1] for i, arg in enumerate(worker) if arg == "--memory-limit"]
    assert limits[-1] == "0", worker


@pytest.mark.parametrize(("cores", "workers"), [(8, 0), (8, 9)])
def test_slurm_workers_must_fit_the_cores(cores, workers):
    with pytest.raises(HarnessError, match=f"{workers} workers on {cores} cores a job: give 1 to {cores} workers"):
        slurm_cluster(cores=cores, workers=workers, memory="1GB", walltime="00:10:00")


@pytest.mark.parametrize(("argv", "message"), [
    (["--workers", "0"], "--workers '0' is not allowed: give a number of worker processes >= 1"),
    (["--workers", "two"], "--workers 'two' is not allowed"),
    (["--workers", "2", "--scheduler", "tcp://h:8786"], "argument --scheduler: not allowed with argument --workers"),
])
@pytest.mark.parametrize("command", [["atlas"], ["advise", "--model", "smollm2-f32", "--format", "bf16",
                                                 "--budget", "1e-5"]])
def test_cli_cluster_options(command, argv, message, capsys):
    from harness.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([*command, *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err
