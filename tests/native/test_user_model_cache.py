"""A model given as a GGUF path keeps its cache entries (baseline, results, atlas points) in the
cache, named by the file's stem: a path in an entry's name would place the entry beside the model
file, out of reach of the cache's location and of its deletion."""

from __future__ import annotations

import os

import pytest

from harness.atlas import store_for
from harness.cache import cache_root
from harness.models import get_model
from harness.runner import ModelSession

pytestmark = pytest.mark.native


def test_a_model_given_as_a_path_keeps_its_entries_in_the_cache(build, tmp_path):
    mine = tmp_path / "models" / "my-model.gguf"
    mine.parent.mkdir()
    mine.symlink_to(get_model("smollm2-q4_1", build).path)
    for name in (str(mine), os.path.relpath(mine)):
        session = ModelSession(name, build)
        try:
            entries = {"baselines": cache_root() / "baselines" / session.entry_name(session.key),
                       "results": session.result_dir("first5"),
                       "atlas": store_for(session, 1).directory}
        finally:
            session.close()
        for kind, entry in entries.items():
            assert entry.parent == cache_root() / kind, entry
            assert entry.name.startswith("my-model-"), entry
    assert entries["results"].name.startswith("my-model-first5-")
