"""The snapshot gate: each model's canary, the hashes of the computation the snapshots were
recorded with (tests/snapshots/CANARY.json). Snapshots are compared where the canary matches,
whatever the compiler or build key (conftest.snapshot_json)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from filelock import FileLock

from harness import matrix

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
FINGERPRINT_FILE = SNAPSHOTS / "FINGERPRINT.json"  # the build they were recorded on: provenance only
CANARY_FILE = SNAPSHOTS / "CANARY.json"
CANARY_RULE = matrix.ffn()  # ffn_norm bf16 at every layer: the suite's own subject


def canary(session) -> dict[str, str]:
    """What the snapshots depend on, in two hashes: the logits of chunk 0's scored positions
    without fake quantization and with CANARY_RULE (bit for bit, any thread count)."""
    def digest(rules) -> str:
        session.ctx.set_fake_quant(rules)
        logits = session.ctx.logits(session.chunks[0], first=matrix.SCORED_FROM)
        return hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()

    try:
        return {"baseline": digest([]), "fake_quant": digest([CANARY_RULE])}
    finally:
        session.ctx.set_fake_quant([])


def recorded_canaries() -> dict[str, dict[str, str]]:
    return json.loads(CANARY_FILE.read_text()) if CANARY_FILE.exists() else {}


def record_canary(label: str, value: dict[str, str]) -> None:
    """Add one model's canary (xdist workers record different models: read, merge, write, locked)."""
    SNAPSHOTS.mkdir(exist_ok=True)
    with FileLock(str(CANARY_FILE) + ".lock"):
        recorded = recorded_canaries()
        recorded[label] = value
        CANARY_FILE.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")


def snapshot_mismatch(label: str, measured: dict[str, str]) -> str | None:
    """Why the recorded snapshots of `label` cannot be compared with this computation (None: they can)."""
    recorded = recorded_canaries().get(label)
    if recorded is None:
        return f"no canary recorded for {label} in {CANARY_FILE.name}"
    changed = [k for k in sorted(measured) if recorded.get(k) != measured[k]]
    if changed:
        return (f"the computation differs from the one the snapshots of {label} were recorded with "
                f"(canary {', '.join(changed)}: logits of chunk 0 sha256 "
                + ", ".join(f"{measured[k][:12]} instead of {str(recorded.get(k))[:12]}" for k in changed) + ")")
    return None
