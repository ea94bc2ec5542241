"""Layer skipping (harness.residuals, llama_fake_quant_start_at) is exact, and refused where it would not be.

- For every start layer L = 1..n_layer of the atlas's two architectures, with no rule, the logits
  of a scored chunk started from the stored residual equal the whole graph's bit for bit, and the
  graph computes fewer nodes the later it starts.
- Atlas points (single layers low and high, both positions of no layer, a block format, a set of
  rules) measured with and without skipping give the same records, timing aside.
- libllama refuses a rule below the start layer, a residual of the wrong size, a start outside the
  layers, a context with an eval callback and a decode without its residual; the atlas then
  measures the point on the whole graph and says so once.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import driver, matrix
from harness.atlas import ModelAtlas, Point, measure_point, measure_rules
from harness.cache import HarnessError
from harness.driver import FakeQuantRule, Start, StartRefused
from harness.residuals import check_start

pytestmark = pytest.mark.native

MODELS = ("smollm2-f32", "gemma3-f32")
CHUNKS = 2


@pytest.fixture(scope="module", params=MODELS)
def session(request, build, offload):
    from harness.runner import ModelSession

    if offload[0] != "cpu":
        pytest.skip("starting at a layer is refused with a GPU backend (verified on the CPU only)")
    s = ModelSession(request.param, build)
    yield s
    s.close()


def whole_and_started(session, layer: int) -> tuple[np.ndarray, np.ndarray]:
    chunk = session.chunks[0]
    whole = session.ctx.logits(chunk, first=matrix.SCORED_FROM)
    started = session.ctx.logits(chunk, first=matrix.SCORED_FROM, start=session.residuals.start(0, layer))
    return whole, started


def test_every_start_layer_gives_the_whole_graphs_logits(session):
    skipped = []
    for layer in range(1, session.model.n_layer + 1):
        whole, started = whole_and_started(session, layer)
        skipped.append(session.ctx.skipped_nodes)
        assert np.array_equal(started.view(np.uint32), whole.view(np.uint32)), f"start at layer {layer}"
    assert 0 < skipped[0] and all(a < b for a, b in zip(skipped, skipped[1:])), skipped
    assert session.residuals.disk_bytes() > 0


def points(n_layer: int) -> list[Point]:
    return [Point("ffn_norm", "bf16", 1), Point("ffn_norm", "mxfp4", n_layer // 2),
            Point("attn_norm", "nvfp4", n_layer - 1), Point("result_output", "bf16"),
            Point("result_norm", "fp8_e4m3")]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "timing"}


def test_points_are_the_same_with_and_without_skipping(session):
    n_layer = session.model.n_layer
    rule_set = [FakeQuantRule("ffn_norm", "bf16", f"3,{n_layer - 2}"), FakeQuantRule("result_output", "bf16")]
    ne0 = ModelAtlas.of(session, CHUNKS).ne0
    measured: dict[bool, list[dict]] = {}
    for skip in (True, False):
        session.skip_layers = skip
        records = []
        for point in points(n_layer):
            records.append(measure_point(session, point, ne0[point.position], CHUNKS))
            assert (session.ctx.skipped_nodes > 0) == skip, point  # it did skip (or did not)
        records.append(measure_rules(session, rule_set, CHUNKS).to_json())
        assert (session.ctx.skipped_nodes > 0) == skip
        measured[skip] = [without_timing(r) for r in records]
    session.skip_layers = True
    assert not session.refused_starts
    assert all("skipped" not in r for r in measured[True])
    assert measured[True] == measured[False]


def test_refusals_and_the_fallback(session, capsys):
    ctx, chunk = session.ctx, session.chunks[0]
    n_layer = session.model.n_layer
    start = session.residuals.start(0, 5)

    def refused(**kw) -> str:
        with pytest.raises(StartRefused) as info:
            ctx.logits(chunk, first=matrix.SCORED_FROM, **kw)
        return str(info.value)

    ctx.set_fake_quant([FakeQuantRule("ffn_norm", "bf16", "2")])
    try:
        assert "'ffn_norm-2', below layer 5" in refused(start=start)
    finally:
        ctx.set_fake_quant([])
    row = start.residual[:1]
    assert f"the residual given for layer 5 has {row.size} values, and 'l_out-4'" in refused(start=Start(5, row))
    assert f"outside 0-{n_layer}" in refused(start=Start(n_layer + 1, start.residual))
    capturing = session.contexts.capturing  # a context with an eval callback
    with pytest.raises(StartRefused, match="eval callback"):
        capturing.logits(chunk[:matrix.SCORED_FROM], start=start)
    # one residual serves one decode: a second decode from the same start has none
    ctx.logits(chunk, first=matrix.SCORED_FROM, start=start)
    driver._llama.llama_memory_clear(ctx.live.memory, True)
    with pytest.raises(HarnessError, match="no residual was given for this ubatch"):
        ctx.decoder._decode(chunk, 0, matrix.SCORED_FROM)
    ctx.decoder._start(None)
    # the whole graph is unaffected after each refusal
    whole, started = whole_and_started(session, 5)
    assert np.array_equal(started.view(np.uint32), whole.view(np.uint32))

    # the fallback: libllama refuses, the point is measured on the whole graph, said once
    rules = [FakeQuantRule("ffn_norm", "bf16", "2")]
    fell_back = measure_rules(session, rules, 1, start=5).to_json()  # as if the planner got the layer wrong
    assert (5, ("ffn_norm",)) in session.refused_starts
    assert "ffn_norm from layer 5 computes every layer: a fake-quant rule selects 'ffn_norm-2', below layer 5" \
        in capsys.readouterr().err
    session.skip_layers = False
    try:
        whole_record = measure_rules(session, rules, 1).to_json()
    finally:
        session.skip_layers = True
    assert without_timing(fell_back) == without_timing(whole_record)


def test_check_start_on_a_short_sequence(session):
    """The architecture sweep's check (harness.residuals.check_start) on the real model: every layer exact."""
    check = check_start(session.model, session.chunks[0][:64])
    assert check.exact == list(range(1, session.model.n_layer + 1)) and not check.refused and not check.differs
    assert check.skipped[session.model.n_layer] < check.nodes
