"""One archive with everything an offline GPU node needs beside a C++ compiler, CMake, Ninja, the
CUDA toolkit and Python with numpy, ml_dtypes and filelock (docs/gpu.md):

    ffn-fake-quant-offline/llama.cpp/   the pinned llama.cpp, trimmed to what the build reads, with its
                                        manifest (harness.source; about 11 MB compressed)
    ffn-fake-quant-offline/site/        the pure-Python packages the harness imports that such a node
                                        may lack (SITE: the bindings, gguf, ...), .py files only
    ffn-fake-quant-offline/project/     this repository's files (tracked and not ignored)
    ffn-fake-quant-offline/PACK.json    what is in it: versions, the manifest's sha256, sizes

On the node: `tar xzf` it and run `project/tools/gpu_check.sh`, or pass it to the script as `--pack`
(it then sets FQ_LLAMA_CPP_SDIST and PYTHONPATH itself).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from harness import source as sources
from harness.cache import HarnessError, progress
from harness.pins import LLAMA_CPP_PYTHON

ROOT = "ffn-fake-quant-offline"
PROJECT = Path(__file__).resolve().parent.parent
# distribution -> its top-level module: the bindings (llama_cpp; their own imports typing_extensions and
# diskcache) and gguf (with PyYAML), which the GPU node of docs/gpu.md does not have
SITE = {"llama-cpp-python": "llama_cpp", "typing_extensions": "typing_extensions", "diskcache": "diskcache",
        "gguf": "gguf", "PyYAML": "yaml"}
TRANSFER_LIMIT = 64 * 2**20  # what one call to the GPU machine carries


def _site(dest: Path) -> dict[str, str]:
    """Copy the .py files of SITE's installed distributions; their versions (the bindings must be the
    pinned ones: their ctypes mirrors are checked against this llama.cpp, harness.abi)."""
    versions = {}
    for dist_name, module in SITE.items():
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise HarnessError(f"pack needs {dist_name} installed here (pip install {dist_name})") from None
        versions[dist_name] = dist.version
        for file in dist.files or ():
            top = file.parts[0]
            if file.suffix == ".py" and (top == module or top == f"{module}.py"):
                target = dest / Path(*file.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file.locate(), target)
    pinned = LLAMA_CPP_PYTHON.requirement.split("==")[1]
    if versions["llama-cpp-python"] != pinned:
        raise HarnessError(f"the installed bindings are llama-cpp-python {versions['llama-cpp-python']}, the "
                           f"pinned llama.cpp is {LLAMA_CPP_PYTHON.requirement}: install that version")
    return versions


def _project(dest: Path) -> int:
    """Copy the repository's tracked and untracked-but-not-ignored files; how many."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise HarnessError(f"pack copies the project's files with git ls-files, which failed in {PROJECT}:\n"
                           f"{listed.stderr.strip()}")
    files = sorted({f for f in listed.stdout.split("\0") if f and (PROJECT / f).is_file()})
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, dest / rel)
    return len(files)


def make_pack(out: Path, given_source: str | None = None) -> Path:
    """Write the archive to `out` (replaced if it exists)."""
    source = sources.locate(given_source)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / ROOT
        if source.kind == "sdist":
            progress("trimming llama.cpp from the sdist")
            sources.make_tree(source.path, root / "llama.cpp")
        else:
            shutil.copytree(source.path, root / "llama.cpp")
        manifest = (root / "llama.cpp" / sources.MANIFEST).read_bytes()
        info = {"llama_cpp_python": LLAMA_CPP_PYTHON.requirement, "sdist_sha256": LLAMA_CPP_PYTHON.sha256,
                "tree_manifest_sha256": hashlib.sha256(manifest).hexdigest(), "site": _site(root / "site"),
                "project_files": _project(root / "project")}
        (root / "PACK.json").write_text(json.dumps(info, indent=1) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(root, arcname=ROOT, filter=lambda t: t.replace(uid=0, gid=0, uname="", gname="", deep=False))
        partial.replace(out)
    size = out.stat().st_size
    progress(f"{out}: {size / 2**20:.1f} MiB" + (f" (more than the {TRANSFER_LIMIT // 2**20} MiB one call to the "
                                                 "GPU machine carries)" if size > TRANSFER_LIMIT else ""))
    return out
