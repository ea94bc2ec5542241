"""The report renders from a real run: the results of `pytest -k first5` (the first5 group on
every model, so that run measures that one group), not only from the synthetic fixture of
tests/unit/test_report.py."""

from __future__ import annotations

import json

import pytest

from harness import matrix
from harness.corpus import load_corpus
from harness.report import render
from harness.verdicts import write_results

pytestmark = [pytest.mark.native, pytest.mark.experiment]


def test_report_renders_first5_run(sessions, build, tmp_path):
    models = {name: sessions[name] for name in sorted(matrix.experiment_models())}
    corpus = load_corpus()
    results = write_results(models, build.fingerprint, {"name": corpus.name, "sha256": corpus.sha256,
                                                        "n_chars": len(corpus.text)},
                            group_ids=["first5"], path=tmp_path / "results.json")
    index = render(results, tmp_path / "report")
    text = index.read_text()
    data = json.loads(results.read_text())
    assert {group["group"] for group in data["groups"]} == {"first5"}
    for group in data["groups"]:
        assert f"`{group['group']}`" in text
        assert f"{group['tokens']['kld_mean']:.3g}" in text
    pngs = list((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
