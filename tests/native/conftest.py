"""Native-test fixtures: native and reference contexts made once per model and test module."""

from __future__ import annotations

import pytest
from native_pair import Pair


@pytest.fixture(scope="module")
def pairs(models, request):
    """pairs(name) -> the model's native_pair.Pair at the module's N_CTX, made once per model in
    this module; its contexts are closed when the module is done."""
    made: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in made:
            made[name] = Pair(models[name], request.module.N_CTX)
        return made[name]

    yield get
    for pair in made.values():
        pair.close()
