"""What the cache holds (`python -m harness cache`) and dropping what the current code can no longer
use (`python -m harness cache prune`): entries of other builds and of other measurement versions.

Every entry is a directory under harness.cache.cache_root(), in one folder per kind. Whether an entry
is current is decided from its name (builds and what they made carry the build key) or from the
key it was made under (KEY_FILE, written by the runner and the atlas). An entry without that file
was made by older code whose keys cannot be read back: it is listed as such and pruned.
Downloads, GGUF metadata and models cut from wheels do not depend on a build and are always kept.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness.build import BACKEND_FLAGS, fingerprint
from harness.cache import KEY_FILE, HarnessError, cache_root
from harness.measurement import ATLAS_VERSION, RESULTS_VERSION
from harness.models import GGUF_INFO_VERSION

BUILD_KEY = re.compile(r"(?:^|-)([0-9a-f]{16})(?:$|-s\d+$)")  # builds/KEY, models/NAME-KEY, arch-models/KEY-sSEED
UNFINISHED_AFTER_S = 24 * 3600  # a temporary directory older than this belongs to a killed run

# kind (its folder) -> how an entry of it is told current: "build" (the build key is in its name),
# "key" (KEY_FILE inside), "baseline" (named after a baseline entry that must exist), "gguf-info"
# (GGUF_INFO_VERSION ends its name), "always" (independent of builds and versions)
KINDS = {
    "downloads": "always", "corpus": "always", "gguf-info": "gguf-info", "builds": "build", "models": "build",
    "arch-models": "build", "baselines": "key", "results": "key", "atlas": "key", "xcheck": "baseline",
    "residuals": "key",
}


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    stale: str | None  # why it can go (None: the current code uses it)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def current_builds() -> set[str]:
    """The build keys of this checkout (patch, flags, compiler) for every backend."""
    keys = set()
    for backend in BACKEND_FLAGS:
        try:
            keys.add(fingerprint(backend)["key"])
        except HarnessError:  # a backend whose fingerprint cannot be taken here has no current build
            continue
    return keys


def _stale(kind: str, path: Path, builds: set[str]) -> str | None:
    rule = KINDS[kind]
    if path.name.startswith("."):  # a temporary sibling of harness.cache.publish / write_atomic
        age = time.time() - path.stat().st_mtime
        return "left by a killed run" if age > UNFINISHED_AFTER_S else None
    if rule == "always":
        return None
    if rule == "gguf-info":
        return None if path.name.endswith(f"-v{GGUF_INFO_VERSION}") else "read by another version of check_gguf"
    if rule == "baseline":
        return None if (path.parent.parent / "baselines" / path.name).is_dir() else "its baseline entry is gone"
    if rule == "build":
        if kind == "builds" and path.name.endswith(".failed.log"):
            return "the log of a failed build"
        made_by = BUILD_KEY.search(path.name)
        if made_by is None:  # a model as shipped, cut from its wheel: no build made it
            return None
        return None if made_by[1] in builds else f"made by another build ({made_by[1]})"
    key_file = path / KEY_FILE
    if not key_file.exists():
        return f"made by older code (no {KEY_FILE})"
    key = json.loads(key_file.read_text())
    if key.get("build") not in builds:
        return f"made by another build ({key.get('build')})"
    if key.get("measurement") != str(RESULTS_VERSION):
        return f"results version {key.get('measurement')} (current {RESULTS_VERSION})"
    if kind == "atlas" and key.get("atlas") != str(ATLAS_VERSION):
        return f"atlas version {key.get('atlas')} (current {ATLAS_VERSION})"
    return None


def inventory(root: Path | None = None) -> list[Entry]:
    """Every entry of every kind, lock files aside; folders of unknown kinds are left alone."""
    root = root or cache_root()
    builds = current_builds()
    entries = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix == ".lock":
                continue
            entries.append(Entry(kind, path, _size(path), _stale(kind, path, builds)))
    return entries


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(entries: list[Entry]) -> str:
    """One line per kind: entries and size, and how much of it is stale."""
    lines = [f"cache {cache_root()}  (builds of this checkout: {', '.join(sorted(current_builds())) or 'none'}; "
             f"results version {RESULTS_VERSION}, atlas version {ATLAS_VERSION})",
             f"{'kind':<12} {'entries':>8} {'size':>10} {'stale':>8} {'stale size':>11}"]
    for kind in KINDS:
        of_kind = [e for e in entries if e.kind == kind]
        if not of_kind:
            continue
        stale = [e for e in of_kind if e.stale]
        lines.append(f"{kind:<12} {len(of_kind):>8} {human(sum(e.bytes for e in of_kind)):>10} "
                     f"{len(stale):>8} {human(sum(e.bytes for e in stale)):>11}")
    total, stale = sum(e.bytes for e in entries), sum(e.bytes for e in entries if e.stale)
    lines.append(f"{'total':<12} {len(entries):>8} {human(total):>10} {'':>8} {human(stale):>11}")
    return "\n".join(lines)


def prune(entries: list[Entry], dry_run: bool = False) -> list[Entry]:
    """Delete the stale entries (all of them, or none with dry_run); returns what was (or would be) deleted."""
    gone = [e for e in entries if e.stale]
    for e in gone:
        if dry_run:
            continue
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            e.path.unlink()
    return gone
