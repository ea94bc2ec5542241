"""Where the pinned llama.cpp source comes from, verified before any build uses it.

- By default: the pinned `llama-cpp-python` sdist, downloaded from PyPI once into the cache.
- `$FQ_LLAMA_CPP_SDIST` (or `python -m harness build --source PATH`) names a local copy instead:
  * the sdist file itself: its sha256 must be the pinned one;
  * a *trimmed tree* made by `python -m harness pack`: the sdist's `vendor/llama.cpp` without what
    the build never reads (TRIMMED: models, docs, ...; about 50 MB of 190 MB), holding a manifest
    (MANIFEST: one `sha256  path` line per file, `sha256sum -c` format). Every file must match its
    line, no file may be missing or extra, and the manifest's own sha256 must be the one pinned in
    harness/pins.py (LLAMA_CPP_TREE_MANIFEST_SHA256).

Why the manifest's hash is pinned, not the manifest: one line in the repo pins every one of the
tree's 3,048 files (a manifest is a pure function of the pinned sdist and TRIMMED, so the pin is
reproducible: tests/native/test_source.py recomputes it), and the pack carries the manifest so
that a damaged file is named. Both sources give the same bits to the compiler, so they share one
build key (the sdist's pinned sha256; native/README.md and docs/gpu.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.cache import HarnessError, fetch_pypi, progress, sha256_file
from harness.pins import LLAMA_CPP_DIR, LLAMA_CPP_PYTHON, LLAMA_CPP_TREE_MANIFEST_SHA256

SOURCE_ENV = "FQ_LLAMA_CPP_SDIST"
MANIFEST = "FQ-MANIFEST.sha256"
# top-level entries of vendor/llama.cpp that no target of the build reads (checked: a tree without
# them configures and builds, tests/native/test_source.py)
TRIMMED = ("models", "docs", "media", "benches", "gguf-py", "conversion", "examples", ".github")
HEADER_DIRS = ("include", "ggml/include")  # the public headers (harness.abi compiles against them)


@dataclass(frozen=True)
class Source:
    """A verified source: the sdist file (kind "sdist") or a trimmed tree (kind "tree")."""

    kind: str
    path: Path


def _hint() -> str:
    return (f"give {SOURCE_ENV} (or --source) the pinned {LLAMA_CPP_PYTHON.filename} (sha256 "
            f"{LLAMA_CPP_PYTHON.sha256}) or a trimmed tree made by `python -m harness pack`")


def locate(given: str | os.PathLike | None = None) -> Source:
    """The source to build from: `given`, else $FQ_LLAMA_CPP_SDIST, else the (downloaded) sdist; verified."""
    value = os.fspath(given) if given is not None else os.environ.get(SOURCE_ENV, "")
    if not value:
        try:
            return Source("sdist", fetch_pypi(LLAMA_CPP_PYTHON))
        except HarnessError as err:
            raise HarnessError(f"{err}\nOffline? {_hint()}") from None
    path = Path(value).expanduser()
    if not path.exists():
        raise HarnessError(f"llama.cpp source {path}: no such file or directory; {_hint()}")
    if path.is_dir():
        verify_tree(path)
        return Source("tree", path)
    verify_sdist(path)
    return Source("sdist", path)


def verify_sdist(path: Path) -> None:
    digest = sha256_file(path)
    if digest != LLAMA_CPP_PYTHON.sha256:
        raise HarnessError(f"{path}: sha256 {digest} is not the pinned {LLAMA_CPP_PYTHON.filename} "
                           f"(expected sha256 {LLAMA_CPP_PYTHON.sha256})")


def is_trimmed(rel: str) -> bool:
    return rel.split("/", 1)[0] in TRIMMED


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """(path relative to llama.cpp, member) of the sdist's vendored tree: regular files only, not
    its ".git" link (to the sdist author's checkout), which would confuse `git apply`."""
    prefix = LLAMA_CPP_DIR + "/"
    for member in tar.getmembers():
        if member.name.startswith(prefix) and member.isfile() and member.name != prefix + ".git":
            yield member.name[len(prefix):], member


def manifest_text(entries: dict[str, str]) -> str:
    """`sha256  path` lines in path order (sha256sum's format, so `sha256sum -c` checks a tree too)."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(entries.items()))


def make_tree(sdist: Path, dest: Path) -> Path:
    """Extract the trimmed tree of a verified sdist into `dest` (created), with its manifest; the
    manifest's sha256 must be the pinned one (a changed TRIMMED list or pin is caught here)."""
    verify_sdist(sdist)
    dest.mkdir(parents=True)
    entries: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for rel, member in _members(tar):
            if is_trimmed(rel):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            digest = hashlib.sha256()
            with src, open(target, "wb") as out:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            target.chmod(member.mode & 0o755 | 0o644)
            entries[rel] = digest.hexdigest()
    text = manifest_text(entries)
    got = hashlib.sha256(text.encode()).hexdigest()
    if got != LLAMA_CPP_TREE_MANIFEST_SHA256:
        raise HarnessError(f"the trimmed tree's manifest has sha256 {got}, pinned "
                           f"{LLAMA_CPP_TREE_MANIFEST_SHA256} (harness/pins.py): TRIMMED or the pin changed")
    (dest / MANIFEST).write_text(text)
    return dest


def verify_tree(root: Path) -> None:
    """Every file of a trimmed tree against its manifest, the manifest against the pin."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise HarnessError(f"{root} is a directory without {MANIFEST}; {_hint()}")
    text = manifest.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != LLAMA_CPP_TREE_MANIFEST_SHA256:
        raise HarnessError(f"{manifest}: sha256 {digest} is not the pinned manifest of the trimmed llama.cpp "
                           f"(expected sha256 {LLAMA_CPP_TREE_MANIFEST_SHA256})")
    expected = {}
    for line in text.splitlines():
        file_digest, rel = line.split("  ", 1)
        expected[rel] = file_digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    present.discard(MANIFEST)
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing or extra:
        raise HarnessError(f"{root} does not match {MANIFEST}: " + "; ".join(
            part for part in (f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                              if missing else "",
                              f"not in the manifest: {', '.join(extra[:5])}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                              if extra else "") if part))
    for rel, file_digest in sorted(expected.items()):
        path = root / rel
        if path.is_symlink():
            raise HarnessError(f"{path} is a symbolic link; the manifest lists regular files only")
        got = sha256_file(path)
        if got != file_digest:
            raise HarnessError(f"{path}: sha256 {got}, expected {file_digest} ({MANIFEST})")


def extract(source: Source, root: Path, only: tuple[str, ...] = ()) -> Path:
    """Copy the llama.cpp tree of `source` (or, with `only`, those subdirectories of it) to
    root/LLAMA_CPP_DIR, where the sdist has it (the same paths, so the same compiler command lines
    and ccache hits for both kinds of source); returns that directory."""
    progress(f"extracting llama.cpp from {source.path}")
    dest = root / LLAMA_CPP_DIR
    wanted = (lambda rel: any(rel.startswith(d + "/") for d in only)) if only else (lambda rel: True)
    if source.kind == "tree":
        for rel in (line.split("  ", 1)[1] for line in (source.path / MANIFEST).read_text().splitlines()):
            if wanted(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.path / rel, dest / rel)
        return dest
    with tarfile.open(source.path) as tar:
        tar.extractall(root, members=[m for rel, m in _members(tar) if wanted(rel)], filter="data")
    return dest
