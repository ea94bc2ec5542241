"""`python -m harness cache [prune]`: entries told current or stale by build key and measurement version."""

from __future__ import annotations

import json
import os
import time

import pytest

from harness import cache_entries
from harness.__main__ import main
from harness.cache import KEY_FILE
from harness.measurement import ATLAS_VERSION, RESULTS_VERSION
from harness.models import GGUF_INFO_VERSION

CURRENT, OTHER = "a" * 16, "b" * 16


def entry(root, kind, name, key=None, size=10):
    path = root / kind / name
    path.mkdir(parents=True)
    (path / "data").write_bytes(b"x" * size)
    if key is not None:
        (path / KEY_FILE).write_text(json.dumps(key))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache_entries, "current_builds", lambda: {CURRENT})
    good = {"build": CURRENT, "measurement": str(RESULTS_VERSION)}
    made = {
        "downloads/llama_cpp_python-0.3.36": None,
        f"builds/{CURRENT}": None,
        f"builds/{OTHER}": "made by another build",
        "models/smollm2-q4_1": None,
        f"models/smollm2-f32-{CURRENT}": None,
        f"models/smollm2-f32-{OTHER}": "made by another build",
        f"arch-models/{OTHER}-s42": "made by another build",
        "baselines/smollm2-f32-1111": None,
        "baselines/smollm2-f32-2222": "made by another build",
        "results/smollm2-f32-all-3333": "results version",
        "results/smollm2-f32-all-4444": "made by older code",
        "atlas/smollm2-f32-5555": None,
        "atlas/smollm2-f32-6666": "atlas version",
        "corpus/0123456789abcdef": None,
        f"gguf-info/0123456789abcdef-v{GGUF_INFO_VERSION}": None,
        "gguf-info/0123456789abcdef-0123456789ab": "another version of check_gguf",
        "xcheck/smollm2-f32-1111": None,
        "xcheck/smollm2-f32-9999": "its baseline entry is gone",
        "residuals/smollm2-f32-aaaa-chunk0": None,
        "residuals/smollm2-f32-bbbb-chunk0": "made by another build",
    }
    keys = {
        "baselines/smollm2-f32-1111": good, "baselines/smollm2-f32-2222": dict(good, build=OTHER),
        "results/smollm2-f32-all-3333": dict(good, measurement=str(RESULTS_VERSION + 1)),
        "atlas/smollm2-f32-5555": dict(good, atlas=str(ATLAS_VERSION)),
        "atlas/smollm2-f32-6666": dict(good, atlas=str(ATLAS_VERSION + 1)),
        "residuals/smollm2-f32-aaaa-chunk0": dict(good, residuals="l_out-N", chunk="0"),
        "residuals/smollm2-f32-bbbb-chunk0": dict(good, build=OTHER, residuals="l_out-N", chunk="0"),
    }
    for name in made:
        entry(tmp_path, *name.split("/"), key=keys.get(name))
    old = entry(tmp_path, "results", ".smollm2-f32-all-7777.tmp")
    os.utime(old, (time.time() - 2 * cache_entries.UNFINISHED_AFTER_S,) * 2)
    made["results/.smollm2-f32-all-7777.tmp"] = "killed run"
    entry(tmp_path, "results", ".smollm2-f32-all-8888.tmp")  # in progress right now: kept
    made["results/.smollm2-f32-all-8888.tmp"] = None
    (tmp_path / "results" / "x.lock").write_text("")
    return tmp_path, made


def test_each_entry_is_told_current_or_stale_with_the_reason(cache):
    root, made = cache
    found = {f"{e.kind}/{e.path.name}": e for e in cache_entries.inventory(root)}
    assert set(found) == set(made)  # lock files are not entries
    for name, reason in made.items():
        stale = found[name].stale
        assert (stale is None) == (reason is None) and (reason is None or reason in stale), (name, stale)


def test_prune_deletes_exactly_the_stale_entries(cache, capsys):
    root, made = cache
    assert main(["cache", "prune", "--dry-run"]) == 0
    assert all((root / name).exists() for name in made)
    assert main(["cache", "prune"]) == 0
    for name, reason in made.items():
        assert (root / name).exists() == (reason is None), name
    out = capsys.readouterr()
    assert f"deleted {sum(r is not None for r in made.values())} entries" in out.out
    assert "made by another build" in out.err
    assert main(["cache"]) == 0
    assert "results" in capsys.readouterr().out


def test_a_bad_action_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "drop"])
    assert exc.value.code == 2 and "invalid choice: 'drop'" in capsys.readouterr().err
