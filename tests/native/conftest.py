"""Native-test fixtures: native and reference contexts made once per model and test module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def lazy_pairs(models):
    """get(name, make) -> make(model), made once per model name in this module; the pairs' native
    and reference contexts are closed when the module is done."""
    made: dict = {}

    def get(name: str, make):
        if name not in made:
            made[name] = make(models[name])
        return made[name]

    yield get
    for pair in made.values():
        pair.native.close()
        pair.ref.close()
