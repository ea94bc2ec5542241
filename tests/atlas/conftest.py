"""The atlas tests run on $FQ_BACKEND's build (default: the CPU's), like the matrix."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def build(offload):
    from harness.build import build as build_llama_cpp

    return build_llama_cpp(offload[0])
