"""harness.compare.compare on hand-made runs: a difference in one logit, in one site or in a count
is reported with where and what, so a broken native or reference side fails the native tests."""

from __future__ import annotations

import numpy as np
import pytest

from harness.compare import Case, Run, compare, first_difference, one_rule_cases
from harness.driver import FakeQuantRule, Target

CASE = Case((FakeQuantRule("ffn_norm", "bf16"),), listed=2)


def logits() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(3, 4) / np.float32(7)


def test_identical_runs_are_equal():
    sites = [("ffn_norm-0", logits()), ("ffn_norm-1", logits() * 2)]
    result = compare(CASE, Run(logits(), 2, sites), Run(logits().copy(), 2, [(n, v.copy()) for n, v in sites]),
                     baseline=logits() + 1)
    assert result.equal and result.bits_equal and result.counts_equal
    assert (result.differ, result.first, result.sites_differ, result.nonfinite) == (0, None, "", (0, 0))
    assert result.changed is True
    assert result.describe() == "ffn_norm bf16: 0 logits differ; sites 2, reference 2, listed 2"


def test_one_differing_logit_is_found_with_its_values_and_bits():
    native, reference = logits(), logits()
    reference[1, 2] = np.nextafter(reference[1, 2], np.float32(np.inf))  # one ulp: only the bits tell
    result = compare(CASE, Run(native, 2), Run(reference, 2), baseline=native)
    assert not result.equal and not result.bits_equal and result.counts_equal
    assert result.differ == 1 and result.changed is False
    first = result.first
    assert (first.where, first.index, first.native, first.reference) == ("logits", (1, 2), float(native[1, 2]),
                                                                          float(reference[1, 2]))
    assert first.reference_bits == first.native_bits + 1
    assert "1 logits differ (logits first differs at (1, 2)" in result.describe()


def test_signed_zero_and_nan_payloads_are_bits():
    native = np.array([0.0, np.nan], dtype=np.float32)
    reference = np.array([-0.0, np.nan], dtype=np.float32)
    assert compare(CASE, Run(native, 2), Run(reference, 2)).differ == 1  # -0 == 0 as floats, not as bits
    reference[0] = 0.0
    reference[1:] = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)  # another NaN payload
    result = compare(CASE, Run(native, 2), Run(reference, 2))
    assert result.differ == 1 and result.first.index == (1,)
    assert result.nonfinite == (1, 1) and "non-finite logits: native 1, reference 1" in result.describe()


def test_counts_that_differ_from_each_other_or_from_the_listing():
    assert not compare(CASE, Run(logits(), 2), Run(logits(), 1)).counts_equal
    result = compare(CASE, Run(logits(), 3), Run(logits(), 3))
    assert result.bits_equal and not result.counts_equal and not result.equal
    assert "sites 3, reference 3, listed 2" in result.describe()
    assert compare(Case(CASE.rules), Run(logits(), 3), Run(logits(), 3)).equal  # nothing listed: not checked


def test_a_differing_site_is_reported_even_when_the_logits_agree():
    good = [("ffn_norm-0", logits()), ("ffn_norm-1", logits())]
    bad = [("ffn_norm-0", logits()), ("ffn_norm-1", logits() * np.float32(1.5))]
    result = compare(CASE, Run(logits(), 2, good), Run(logits(), 2, bad))
    assert result.differ == 0 and not result.equal
    assert result.sites_differ.startswith("11 values differ; site 1 (ffn_norm-1) first differs at (0, 1)")
    missing = compare(CASE, Run(logits(), 2, good), Run(logits(), 2, good[:1]))
    assert missing.sites_differ == "2 native sites, 1 reference sites" and not missing.equal
    renamed = compare(CASE, Run(logits(), 2, good), Run(logits(), 2, [good[0], ("attn_norm-1", logits())]))
    assert renamed.sites_differ == "site 1: native ffn_norm-1 (3, 4), reference attn_norm-1 (3, 4)"


def test_a_refusal_is_not_equal_and_says_why():
    result = compare(CASE, Run(np.empty((0, 4), np.float32), 0, error="unknown fake-quant format"), Run(logits(), 2))
    assert result.differ is None and not result.equal
    assert result.describe() == "ffn_norm bf16: refused: unknown fake-quant format"


def test_logits_of_other_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"native logits \(3, 4\), reference \(2, 4\)"):
        compare(CASE, Run(logits(), 2), Run(logits()[:2], 2))


def test_first_difference_and_the_case_list():
    assert first_difference(logits(), logits(), "x") == (0, None)
    targets = [Target("pp", "ffn_norm", (0, 1), (4, 3), 2), Target("pp", "result_output", (), (9, 3), 1)]
    cases = one_rule_cases(targets, ["bf16", "f16"])
    assert [(c.label, c.listed) for c in cases] == [("ffn_norm bf16", 2), ("ffn_norm f16", 2),
                                                    ("result_output bf16", 1), ("result_output f16", 1)]
    assert Case((FakeQuantRule("ffn_norm", "q8_0", "0-4", 0.5), FakeQuantRule("result_output", "bf16"))).label == \
        "ffn_norm q8_0 layers 0-4 scale 0.5 + result_output bf16"
