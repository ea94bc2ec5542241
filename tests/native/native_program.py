"""A test program that calls the patch's exported C++ functions (llama-fake-quant.h) on small ggml
graphs: compiled against the patched headers and linked to the cached build's libllama (the build
is reused, never rebuilt here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from harness.build import PATCH, Build
from harness.cache import fetch_pypi
from harness.pins import LLAMA_CPP_DIR, LLAMA_CPP_PYTHON


def _headers(dest: Path) -> Path:
    """Only the two headers the programs include: ggml.h from the pinned sdist and llama-fake-quant.h,
    which the patch creates; the patch's hunks for both are applied. The rest of the 3,900-file tree
    is not extracted."""
    sdist = fetch_pypi(LLAMA_CPP_PYTHON)  # cached (and verified) since the build was made
    wanted = f"{LLAMA_CPP_DIR}/ggml/include/ggml.h"
    with tarfile.open(sdist) as tar:
        member = tar.getmember(wanted)
        member.name = "ggml/include/ggml.h"
        tar.extract(member, dest, filter="data")
    # outside any repository (a basetemp inside one would make git apply the patch relative to its top)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(dest.parent))
    applied = subprocess.run(["git", "apply", "--include=ggml/include/ggml.h", "--include=src/llama-fake-quant.h",
                              str(PATCH)], cwd=dest, capture_output=True, text=True, env=env, check=False)
    header = dest / "src" / "llama-fake-quant.h"
    if applied.returncode != 0 or not header.exists():
        pytest.fail(f"could not take src/llama-fake-quant.h from {PATCH.name}: {applied.stderr.strip()}")
    return dest


def compile_program(source: Path, build: Build, dest: Path) -> Path:
    """`source` compiled in `dest` and linked to the build's libllama; a compile error fails the test."""
    gxx = shutil.which("g++")
    if gxx is None:  # the llama.cpp build needs a C++ compiler anyway: a missing one is an error, not a skip
        pytest.fail(f"g++ is not installed: it is needed to compile {source} (and llama.cpp itself): "
                    "apt-get install -y g++")
    root = _headers(dest)
    exe = root / source.stem
    bin_dir = str(build.bin_dir)
    cmd = [gxx, "-std=c++17", "-Wall", "-Wextra", "-I", str(root / "ggml" / "include"), "-I", str(root / "src"),
           str(source), "-o", str(exe), "-L", bin_dir, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bin_dir}"]
    compiled = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if compiled.returncode != 0:
        pytest.fail(f"compiling {source.name} failed:\n{compiled.stderr[-4000:]}")
    return exe
