"""The declared measurement version (harness.measurement): cache keys hold versions, not source
text, and a change to the measurement code fails here until it is confirmed or the version bumped."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from harness import measurement
from harness.runner import ModelSession


def test_the_measurement_code_is_confirmed():
    problems = measurement.unconfirmed()
    lines = "\n".join(measurement.confirmation_line(p) for p in measurement.ROOTS)
    assert not problems, (
        "; ".join(problems) + ". Decide in this commit: if results may change, bump RESULTS_VERSION or "
        "ATLAS_VERSION; if not, say which re-measured sample was identical. Then add to "
        f"harness/measurement.py CONFIRMATIONS:\n{lines}")


def test_each_part_covers_what_its_measurement_imports():
    results, atlas = measurement.modules("results"), measurement.modules("atlas")
    for name in ("runner", "metrics", "numerics", "corpus", "driver", "models", "matrix", "reference", "rounding"):
        assert f"harness.{name}" in results
    assert {"harness.atlas", "harness.intervals"} <= set(atlas) and not set(atlas) & set(results)
    for name in ("report", "atlas_report", "verdicts", "bench", "measurement", "build", "cache"):
        assert f"harness.{name}" not in results + atlas


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A copy of the harness package that measurement reads instead of the real one."""
    copy = tmp_path / "harness"
    shutil.copytree(measurement.HARNESS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(measurement, "HARNESS", copy)
    return copy


def test_docstrings_comments_and_layout_do_not_count(package):
    before = {p: measurement.fingerprint(p) for p in measurement.ROOTS}
    metrics = package / "metrics.py"
    text = metrics.read_text()
    first = text.index('"""', 3) + 3  # after the module docstring
    metrics.write_text('"""Another docstring."""' + text[first:].replace("\n\n\n", "\n\n\n# a comment\n", 1))
    (package / "report.py").write_text("# not a measurement module\n")
    assert {p: measurement.fingerprint(p) for p in measurement.ROOTS} == before


def test_a_code_change_counts_and_a_moved_module_stays_covered(package):
    before = measurement.fingerprint("results")
    numerics = package / "numerics.py"
    numerics.write_text(numerics.read_text() + "\nTHRESHOLD = 2\n")
    assert measurement.fingerprint("results") != before
    # metrics moved into a subpackage: still found through the imports that name it
    (package / "stats").mkdir()
    (package / "stats" / "__init__.py").write_text("")
    (package / "metrics.py").rename(package / "stats" / "metrics.py")
    for py in package.glob("*.py"):
        py.write_text(py.read_text().replace("from harness.metrics import", "from harness.stats.metrics import"))
    assert "harness.stats.metrics" in measurement.modules("results")


def test_a_relative_import_is_refused(package):
    (package / "numerics.py").write_text("from .metrics import summarize\n")
    with pytest.raises(ValueError, match="relative import of 'metrics'"):
        measurement.modules("results")


def test_a_version_without_its_confirmation_is_reported(monkeypatch):
    monkeypatch.setattr(measurement, "RESULTS_VERSION", measurement.RESULTS_VERSION + 1)
    assert any("the version is" in p for p in measurement.unconfirmed())


def test_the_results_key_is_values_only():
    """No source text or fingerprint in the key: moving code cannot invalidate a measurement."""
    fake = SimpleNamespace(file=SimpleNamespace(sha256="m"), build=SimpleNamespace(fingerprint={"key": "b"}),
                           corpus=SimpleNamespace(sha256="c"), gpu_layers=0)
    key = ModelSession.key.func(fake)
    assert key["measurement"] == str(measurement.RESULTS_VERSION)
    assert {k: v for k, v in key.items() if k != "measurement"} == {
        "model": "m", "build": "b", "corpus": "c", "n_ctx": "512", "scored_from": "64", "main_chunks": "9",
        "numerics_tokens": "128", "generation": "50/42"}


def test_verify_reports_a_record_that_differs():
    """harness.verify: equal records (timing aside) compare identical; any other change is reported."""
    from harness.verify import Outcome, array_differences, as_stored, differences

    cached = {"group": "first5", "tokens": {"kld_mean": 1.5e-5, "n": 447}, "rules": [{"layers": "0-4"}],
              "timing": {"wall_s": 1.0}}
    same = as_stored(dict(cached, timing={"wall_s": 9.0}))
    assert differences(cached, same) == []
    changed = as_stored(cached)
    changed["tokens"]["kld_mean"] = 1.5e-5 * (1 + 2 ** -52)
    changed["rules"].append({"layers": "5"})
    del changed["group"]
    assert differences(cached, changed) == ["group: only in the cached record", "rules: 1 items cached, 2 now",
                                            f"tokens.kld_mean: 1.5e-05 != {changed['tokens']['kld_mean']!r}"]
    assert differences({"n": 1}, {"n": 1.0}) == ["n: 1 != 1.0"]
    a = {"kld": np.array([0.0, 1.0], np.float32)}
    assert array_differences(a, {"kld": a["kld"].copy()}) == []
    assert array_differences(a, {"kld": a["kld"].astype(np.float64)}) != []
    assert array_differences(a, {"kld": np.array([-0.0, 1.0], np.float32)}) != []  # bits, not values
    outcome = Outcome()
    outcome.add("same", [])
    outcome.add("other", differences(cached, changed))
    assert set(outcome.differing) == {"other"} and outcome.text().startswith("2 compared, 1 identical")
