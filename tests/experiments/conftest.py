"""Experiment fixtures: one ModelSession per model and worker, each model's verdict family
computed once per worker, and the snapshot check.

Snapshots live in tests/snapshots/, one JSON file each (so parallel --snapshot-update loses
nothing). They are compared wherever the computation is the one they were recorded with, whatever
the compiler or the build key: a canary per model (tests/snapshots/CANARY.json: the sha256 of the
logits of corpus chunk 0 without fake quantization and with ffn_norm bf16 at every layer) is
recomputed (two decodes) and must match. When it differs, only the snapshot comparison is skipped
with a message, every other assertion of the test still runs; with CI=true it fails instead, so a
change that moves the bits re-records the snapshots in the same commit. FINGERPRINT.json records
the build they were recorded on (provenance only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from harness import matrix
from harness.verdicts import record_command

from snapshot_gate import FINGERPRINT_FILE, SNAPSHOTS, canary, record_canary, snapshot_mismatch


def in_ci() -> bool:
    """CI=true (.ci/run sets it; tox.ini passes it on)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def ci() -> bool:
    return in_ci()


class TestsSnapshotsDir(JSONSnapshotExtension):
    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(SNAPSHOTS / test_location.basename)


@pytest.fixture(scope="session")
def build(offload):
    """The matrix runs on $FQ_BACKEND's build (default: the CPU's); its snapshots were recorded on the CPU
    build, so on another backend their comparison is skipped (or fails under CI=true)."""
    from harness.build import build as build_llama_cpp

    return build_llama_cpp(offload[0])


@pytest.fixture(scope="session")
def sessions(build, offload):
    from harness.runner import ModelSession

    made: dict = {}

    class Sessions(dict):
        def __missing__(self, name: str):
            made[name] = ModelSession(name, build, gpu_layers=offload[1])
            self[name] = made[name]
            return made[name]

    yield Sessions()
    for session in made.values():
        session.close()


@pytest.fixture(scope="session")
def families(sessions):
    """model name -> its verdict family (harness.verdicts.family), computed once per worker."""
    from harness.verdicts import family

    class Families(dict):
        def __missing__(self, name: str):
            self[name] = family(name, sessions[name].run)
            return self[name]

    return Families()


@pytest.fixture(scope="session")
def canaries(sessions):
    """model name -> its canary, computed once per worker."""
    class Canaries(dict):
        def __missing__(self, name: str):
            self[name] = canary(sessions[name])
            return self[name]

    return Canaries()


@pytest.fixture
def snapshot_json(snapshot, build, canaries, request) -> Callable[[object, str], None]:
    """check(value, model): compare value with this test's snapshot. Call it last: it is the only
    assertion that depends on the computation's bits, and it skips (or, with CI=true, fails) when
    the model's canary differs from the recorded one or no snapshot is recorded."""
    extension = snapshot.use_extension(TestsSnapshotsDir)
    file = SNAPSHOTS / request.path.stem / f"{request.node.name}.json"

    def check(value: object, model: str) -> None:
        label = matrix.model_label(model)
        if request.config.option.update_snapshots:
            SNAPSHOTS.mkdir(exist_ok=True)
            FINGERPRINT_FILE.write_text(json.dumps(build.fingerprint, indent=1) + "\n")
            record_canary(label, canaries[model])
            assert extension == value
            return
        reason = snapshot_mismatch(label, canaries[model])
        if reason is None and not file.exists():
            reason = f"no snapshot recorded for {request.node.name}"
        if reason is not None:
            message = f"snapshot comparison not made: {reason}; review, then re-record with `{record_command()}`"
            if in_ci():
                pytest.fail(f"CI=true: {message}", pytrace=False)
            pytest.skip(message)
        assert extension == value

    return check
