"""Shared fixtures: one patched build per session (cached across runs), models loaded once per
worker, and llama.cpp threads = cores // xdist workers so parallel runs do not oversubscribe."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# only in xdist workers (the controller's environment is inherited by them): cores // workers,
# since oversubscribed OpenMP threads spin against each other (5x slower, measured)
if "PYTEST_XDIST_WORKER" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("FQ_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (a full build)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="a full llama.cpp build (minutes): run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def build():
    from harness.build import build as build_llama_cpp

    return build_llama_cpp()


@pytest.fixture(scope="session")
def offload() -> tuple[str, int]:
    """(backend, layers offloaded) for the matrix and the atlas: $FQ_BACKEND, $FQ_GPU_LAYERS (default:
    the CPU). tests/native checks each backend on its own and ignores them."""
    from harness.build import offload as choose

    return choose()


@pytest.fixture(scope="session")
def models(build) -> Iterator[dict]:
    """name -> loaded harness.driver.Model, loaded on first use and kept for the session."""
    from harness.driver import Model
    from harness.models import get_model

    loaded: dict = {}

    class Loader(dict):
        def __missing__(self, name: str):
            loaded[name] = Model(get_model(name, build).path, build)
            self[name] = loaded[name]
            return loaded[name]

    yield Loader()
    for model in loaded.values():
        model.close()
