"""Experiment fixtures: one ModelSession per model and worker; snapshots in tests/snapshots/,
one JSON file per snapshot (so parallel --snapshot-update loses nothing), each set recorded
with the build fingerprint it was made with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
FINGERPRINT_FILE = SNAPSHOTS / "FINGERPRINT.json"


class TestsSnapshotsDir(JSONSnapshotExtension):
    @classmethod
    def dirname(cls, *, test_location) -> str:
        return str(SNAPSHOTS / test_location.basename)


@pytest.fixture(scope="session")
def sessions(build):
    from harness.runner import ModelSession

    made: dict = {}

    class Sessions(dict):
        def __missing__(self, name: str):
            made[name] = ModelSession(name, build)
            self[name] = made[name]
            return made[name]

    yield Sessions()
    for session in made.values():
        session.close()


@pytest.fixture
def snapshot_json(snapshot, build, request):
    """The snapshot fixture, or a skip when the snapshots were recorded with another build:
    their exact tokens belong to that build's arithmetic, not to a regression here."""
    key = build.fingerprint["key"]
    if request.config.option.update_snapshots:
        SNAPSHOTS.mkdir(exist_ok=True)
        FINGERPRINT_FILE.write_text(json.dumps({k: v for k, v in build.fingerprint.items()}, indent=1) + "\n")
    elif FINGERPRINT_FILE.exists():
        recorded = json.loads(FINGERPRINT_FILE.read_text())["key"]
        if recorded != key:
            pytest.skip(f"snapshots were recorded with build {recorded}, this is build {key}: "
                        "re-record with --snapshot-update after reviewing the change")
    return snapshot.use_extension(TestsSnapshotsDir)
