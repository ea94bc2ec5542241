"""The test tree's layout: pytest's default import mode ("prepend") imports every test file by
its basename, so two files with one name in different folders fail collection ("import file
mismatch") on a clean checkout, which is how CI saw it while a warm tree did not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_names_are_unique():
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert not {name: n for name, n in names.items() if n > 1}
