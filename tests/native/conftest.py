"""Native-test fixtures: native and reference contexts made once per model and test module."""

from __future__ import annotations

import pytest

from harness.compare import TEXT, Sides


@pytest.fixture(scope="module")
def pairs(models, request):
    """pairs(name) -> harness.compare.Sides on the model with TEXT's first N_CTX tokens (the module's
    N_CTX, also the contexts' size), made once per model in this module; closed when the module is done."""
    made: dict[str, Sides] = {}

    def get(name: str) -> Sides:
        if name not in made:
            n_ctx = request.module.N_CTX
            made[name] = Sides(models[name], models[name].tokenize(TEXT)[:n_ctx], n_ctx)
        return made[name]

    yield get
    for sides in made.values():
        sides.close()
