"""Re-measure a sample of cached matrix groups and atlas points with the code as it is, and compare.

The evidence a measurement confirmation (harness.measurement) asks for: a refactor that keeps the
version must reproduce what the cache holds, bit for bit. Nothing is written to the cache: groups
are measured by ModelSession's measuring step and atlas points by harness.atlas.measure_point, both
in memory (the baseline they read is the one already cached). Records are compared after a JSON
round trip, as the cache stores them; only timing differs between runs and is left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORED = frozenset({"timing"})  # wall and compute seconds: the only fields that differ between runs


def differences(cached: Any, fresh: Any, path: str = "") -> list[str]:
    """Where `fresh` differs from `cached` (JSON values), as `path: cached != fresh`; keys in
    IGNORED are left out at every depth. Floats must be equal, not close."""
    if isinstance(cached, dict) and isinstance(fresh, dict):
        found = []
        for key in sorted((cached.keys() | fresh.keys()) - IGNORED):
            where = f"{path}.{key}" if path else str(key)
            if key not in cached or key not in fresh:
                found.append(f"{where}: only in the {'cached' if key in cached else 'fresh'} record")
            else:
                found += differences(cached[key], fresh[key], where)
        return found
    if isinstance(cached, list) and isinstance(fresh, list):
        if len(cached) != len(fresh):
            return [f"{path}: {len(cached)} items cached, {len(fresh)} now"]
        return [d for i, (a, b) in enumerate(zip(cached, fresh)) for d in differences(a, b, f"{path}[{i}]")]
    if type(cached) is not type(fresh) or cached != fresh:
        return [f"{path}: {cached!r} != {fresh!r}"]
    return []


def array_differences(cached: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> list[str]:
    """Per-token arrays that are not bit-identical (name, dtype, shape and bytes)."""
    found = [f"arrays.{k}: only in the {'cached' if k in cached else 'fresh'} arrays"
             for k in sorted(cached.keys() ^ fresh.keys())]
    for k in sorted(cached.keys() & fresh.keys()):
        a, b = np.asarray(cached[k]), np.asarray(fresh[k])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            found.append(f"arrays.{k}: differs ({a.dtype}{a.shape} cached, {b.dtype}{b.shape} now)")
    return found


def as_stored(record: dict) -> Any:
    """A record as the cache holds it (JSON round trip: tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(record))


@dataclass
class Outcome:
    compared: list[str] = field(default_factory=list)
    differing: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, found: list[str]) -> None:
        self.compared.append(name)
        if found:
            self.differing[name] = found

    def text(self) -> str:
        lines = [f"{len(self.compared)} compared, {len(self.compared) - len(self.differing)} identical "
                 f"(timing aside): {', '.join(self.compared)}"]
        for name, found in self.differing.items():
            lines += [f"DIFFERS {name}:", *(f"  {d}" for d in found[:20])]
        return "\n".join(lines)


def spread(items: Sequence, n: int) -> list:
    """`n` items evenly spaced over `items` (all when there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)] if n else []


def sample_groups(groups: Sequence, n: int) -> list:
    """`n` groups: the cheapest one with each optional part (tasks, generation, numerics) first, so that
    every step of the measurement is re-run, then others evenly spread, cheapest chunks first."""
    by_cost = sorted(groups, key=lambda g: (g.chunks + 8 * g.tasks, g.id))
    chosen: list = []
    for part in ("tasks", "generation", "numerics"):
        with_part = [g for g in by_cost if getattr(g, part)]
        if with_part and not any(getattr(g, part) for g in chosen) and len(chosen) < n:
            chosen.append(with_part[0])
    rest = [g for g in by_cost if g not in chosen and not (g.generation or g.tasks or g.numerics)]
    return chosen + spread(rest, n - len(chosen))


def verify_groups(session, n: int, outcome: Outcome) -> None:
    """Re-measure `n` of the session's cached groups in memory and compare record and arrays."""
    cached = [g for g in session.groups.values() if (session.result_dir(g.id) / "record.json").exists()]
    for group in sample_groups(cached, n):
        stored = session.result_dir(group.id)
        record, arrays = session._measure(group)
        with np.load(stored / "arrays.npz") as data:
            found = array_differences({k: data[k] for k in data.files}, arrays)
        found += differences(json.loads((stored / "record.json").read_text()), as_stored(record.to_json()))
        outcome.add(f"{session.name}/{group.id}", found)


def sample_points(records: Sequence[dict], n: int) -> list[dict]:
    """`n` cached points: one of each kind (measured, skipped, non-finite) when present, then measured
    ones evenly spread, fewest chunks first."""
    kinds = {"skipped": [r for r in records if "skipped" in r],
             "non-finite": [r for r in records if "non_finite" in r]}
    measured = sorted((r for r in records if "skipped" not in r and "non_finite" not in r),
                      key=lambda r: (r["chunks"], json.dumps(r["point"])))
    chosen = [found[0] for found in kinds.values() if found][:n]
    return chosen + spread(measured, n - len(chosen))


def verify_points(atlas, n: int, outcome: Outcome) -> None:
    """Re-measure `n` of the atlas's cached points in memory (harness.atlas.ModelAtlas.measure)."""
    from harness.atlas import Point

    records = [json.loads(p.read_text()) for p in sorted(atlas.store.directory.glob("*/point.json"))]
    for cached in sample_points(records, n):
        point = Point(**cached["point"])
        fresh = atlas.measure(point)
        outcome.add(f"{atlas.facts.name}/{point.slug}", differences(cached, as_stored(fresh)))


def verify(model: str, groups: int, points: int, max_chunks: int, backend: str = "cpu", gpu_layers: int = 0) -> Outcome:
    from harness.atlas import ModelAtlas
    from harness.build import build
    from harness.corpus import load_corpus
    from harness.runner import ModelSession

    outcome = Outcome()
    session = ModelSession(model, build(backend), load_corpus(), gpu_layers=gpu_layers)
    try:
        verify_groups(session, groups, outcome)
        verify_points(ModelAtlas.of(session, max_chunks), points, outcome)
    finally:
        session.close()
    return outcome
