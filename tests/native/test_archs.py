"""Every architecture llama.cpp's test-llama-archs can write: every name of its computed graph,
fake-quantized natively, gives the reference's logits bits and count; ffn_norm is there, or the
error names what is there instead; a graph started at each layer gives the whole graph's logits
bits, or is refused. Models that cannot load or run here (without fake quantization) are reported
with the reason, in the table of native/README.md."""

from __future__ import annotations

import pytest

from harness.archs import check_all, table

pytestmark = pytest.mark.native


def test_every_architecture(build):
    results = check_all(build)
    print(table(results))
    assert len(results) >= 100, f"test-llama-archs wrote only {len(results)} models"
    failed = [f"{r.model}: {'; '.join(r.mismatches)}" for r in results if r.status == "mismatch"]
    assert not failed, "\n".join(failed)
    assert sum(r.status == "ok" for r in results) >= 100
    assert not [r.model for r in results if r.start_kind == "differs"]  # also a mismatch, above
    assert sum(r.start_kind == "every" for r in results) >= 100, "starting at a layer is refused by most architectures"
