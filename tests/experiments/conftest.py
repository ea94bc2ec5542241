"""Experiment fixtures: one ModelSession per model and worker, each model's verdict family
computed once per worker, and the snapshot check.

Snapshots live in tests/snapshots/, one JSON file each (so parallel --snapshot-update loses
nothing), recorded with the build fingerprint in tests/snapshots/FINGERPRINT.json. Only the
snapshot comparison depends on the build: on another build it is skipped with a message, every
other assertion of the test still runs; with CI=true a differing fingerprint fails instead, so a
change to the patch or the flags re-records the snapshots in the same commit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

from harness.verdicts import record_command

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
FINGERPRINT_FILE = SNAPSHOTS / "FINGERPRINT.json"


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


def snapshot_mismatch(build_key: str) -> str | None:
    """Why recorded snapshots cannot be compared with this build's results (None: they can)."""
    if not FINGERPRINT_FILE.exists():
        return f"no {FINGERPRINT_FILE.name} recorded"
    recorded = json.loads(FINGERPRINT_FILE.read_text())["key"]
    if recorded != build_key:
        return f"snapshots were recorded with build {recorded}, this is build {build_key}"
    return None


@pytest.fixture
def snapshot_json(snapshot, build, request) -> Callable[[object], None]:
    """check(value): compare value with this test's snapshot. Call it last: it is the only
    assertion that depends on the build, and it skips (or, with CI=true, fails) when the
    snapshot belongs to another build or none is recorded."""
    key = build.fingerprint["key"]
    extension = snapshot.use_extension(TestsSnapshotsDir)
    file = SNAPSHOTS / request.path.stem / f"{request.node.name}.json"

    def check(value: object) -> None:
        if request.config.option.update_snapshots:
            SNAPSHOTS.mkdir(exist_ok=True)
            FINGERPRINT_FILE.write_text(json.dumps(build.fingerprint, indent=1) + "\n")
            assert extension == value
            return
        reason = snapshot_mismatch(key)
        if reason is None and not file.exists():
            reason = f"no snapshot recorded for {request.node.name}"
        if reason is not None:
            message = f"snapshot comparison not made: {reason}; review, then re-record with `{record_command()}`"
            if in_ci():
                pytest.fail(f"CI=true: {message}", pytrace=False)
            pytest.skip(message)
        assert extension == value

    return check
