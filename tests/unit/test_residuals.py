"""harness.residuals without a model: where a measurement starts, the switch, the sweep's cell."""

from __future__ import annotations

import pytest

from harness.cache import HarnessError
from harness.driver import EVERY_LAYER, FakeQuantRule
from harness.residuals import SKIP_ENV, StartCheck, skipping_enabled, start_layer

N_LAYER = 30


@pytest.mark.parametrize(("rules", "expected"), [
    ([FakeQuantRule("ffn_norm", "bf16", "7")], 7),
    ([FakeQuantRule("ffn_norm", "bf16", "12,3")], 3),
    ([FakeQuantRule("ffn_norm", "bf16", "20-25,4")], 4),
    ([FakeQuantRule("attn_norm", "bf16", "29")], 29),
    ([FakeQuantRule("ffn_norm", "bf16", EVERY_LAYER)], 0),
    ([FakeQuantRule("result_output", "bf16")], N_LAYER),           # after the last layer
    ([FakeQuantRule("result_norm", "f16"), FakeQuantRule("result_output", "bf16")], N_LAYER),
    ([FakeQuantRule("ffn_norm", "bf16", "18"), FakeQuantRule("result_output", "bf16")], 18),
    ([FakeQuantRule("ffn_norm", "bf16", "18"), FakeQuantRule("attn_norm", "bf16", EVERY_LAYER)], 0),
    ([FakeQuantRule("l_out", "bf16", "0")], 0),
])
def test_start_layer_is_the_first_layer_a_rule_changes(rules, expected):
    assert start_layer(rules, N_LAYER) == expected


def test_a_layer_spec_outside_the_model_is_an_error():
    with pytest.raises(ValueError, match="outside 0..29"):
        start_layer([FakeQuantRule("ffn_norm", "bf16", "30")], N_LAYER)


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("1", True), ("0", False)])
def test_the_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(SKIP_ENV, raising=False)
    else:
        monkeypatch.setenv(SKIP_ENV, value)
    assert skipping_enabled() is expected


@pytest.mark.parametrize("value", ["yes", "", "2", "off"])
def test_a_bad_switch_names_the_value_and_what_is_allowed(monkeypatch, value):
    monkeypatch.setenv(SKIP_ENV, value)
    with pytest.raises(HarnessError, match=f"{SKIP_ENV}='{value}' is not allowed \\(allowed: 1 .* 0 "):
        skipping_enabled()


def test_the_sweep_cell():
    cell = StartCheck(exact=[1, 2, 3, 5], refused={4: "the graph names no l_out-<L-1>"}, skipped={5: 90}, nodes=100)
    assert cell.text() == ("exact at L = 1-3,5 (90 of 100 nodes skipped at L = 5); "
                           "refused at L = 4: the graph names no l_out-<L-1>")
    assert StartCheck(exact=[1], differs=[2, 3], skipped={1: 5}, nodes=9).text() == \
        "**differs** at L = 2-3; exact at L = 1 (5 of 9 nodes skipped at L = 1)"
    assert StartCheck(refused={1: "x", 2: "x", 4: "y"}).text() == "refused at L = 1-2: x; refused at L = 4: y"
    assert StartCheck().text() == "–"
    assert [c.kind for c in (cell, StartCheck(exact=[1], differs=[2]), StartCheck(exact=[1, 2]),
                             StartCheck(refused={1: "x"}))] == ["some", "differs", "every", "none"]
