"""Build the patched llama.cpp: pinned sdist → verified → patched → CMake/Ninja, cached by key.

The key hashes everything that decides the bits of the result: the sdist, the patch, the CMake
flags (CPU features pinned, never -march=native) and the compiler. One compile per key, ever;
concurrent callers wait on a lock; a half-finished build is never published.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.cache import HarnessError, cache_root, fetch_pypi, progress, publish, sha256_file
from harness.pins import LLAMA_CPP_COMMIT, LLAMA_CPP_DIR, LLAMA_CPP_PYTHON

PATCH = Path(__file__).resolve().parent.parent / "native" / "fake-quant.patch"

# test-llama-archs is llama.cpp's own writer of tiny random-weight models of every architecture
TOOLS = ("llama-completion", "llama-cli", "llama-perplexity", "llama-quantize", "llama-bench", "test-llama-archs")

# x86-64-v3 (AVX2, FMA, F16C, BMI2) exactly, nothing detected from the build host: the same
# bits on every machine of that level. No AVX512: its BF16 row conversion flushes subnormals.
CPU_FLAGS = (
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF", "-DGGML_AVX512_BF16=OFF",
    "-DGGML_CPU_ALL_VARIANTS=OFF", "-DGGML_BACKEND_DL=OFF", "-DGGML_OPENMP=ON",
)
CMAKE_FLAGS = (
    "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
) + CPU_FLAGS
# the CPU backend is always there; a second backend is added to it. Vulkan is tested here on Mesa's
# lavapipe (a CPU Vulkan driver); CUDA is offered, and not built or tested by this suite.
BACKEND_FLAGS = {"cpu": (), "vulkan": ("-DGGML_VULKAN=ON",), "cuda": ("-DGGML_CUDA=ON",)}
# what each backend's build needs on the build machine: (file or program, Debian package)
BACKEND_NEEDS = {
    "vulkan": (("/usr/include/vulkan/vulkan.hpp", "libvulkan-dev"), ("glslc", "glslc"),
               ("/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake", "spirv-headers")),
    "cuda": (("nvcc", "nvidia-cuda-toolkit"),),
}


@dataclass(frozen=True)
class Build:
    """A finished build: tools and shared libraries side by side in `bin_dir`."""

    bin_dir: Path
    fingerprint: dict[str, str]

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def _compiler() -> str:
    out = subprocess.run(["c++", "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def _check_backend(backend: str) -> None:
    """A clear error for a missing build requirement (fingerprint() has checked the name)."""
    missing = [package for need, package in BACKEND_NEEDS.get(backend, ())
               if not (Path(need).exists() if need.startswith("/") else shutil.which(need))]
    if missing:
        raise HarnessError(f"building the {backend} backend needs {', '.join(missing)}: "
                           f"apt-get install -y {' '.join(missing)}")


def fingerprint(backend: str = "cpu") -> dict[str, str]:
    """What went into the build; `key` names its cache directory."""
    if not PATCH.exists():
        raise HarnessError(f"the native patch is missing: {PATCH}")
    if backend not in BACKEND_FLAGS:
        raise HarnessError(f"unknown backend {backend!r} (allowed: {', '.join(BACKEND_FLAGS)})")
    flags = list(CMAKE_FLAGS + BACKEND_FLAGS[backend])
    fp = {
        "llama_cpp_python": LLAMA_CPP_PYTHON.requirement,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "sdist_sha256": LLAMA_CPP_PYTHON.sha256,
        "patch_sha256": sha256_file(PATCH),
        "flags": " ".join(flags),
        "compiler": _compiler(),
    }
    fp["key"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    progress(f"extracting {LLAMA_CPP_DIR} from {sdist.name}")
    with tarfile.open(sdist) as tar:
        # not its ".git" link (to the sdist author's checkout), which would confuse `git apply`
        members = [m for m in tar.getmembers()
                   if m.name.startswith(LLAMA_CPP_DIR + "/") and m.name != LLAMA_CPP_DIR + "/.git"]
        tar.extractall(dest, members=members, filter="data")
    return dest / LLAMA_CPP_DIR


def apply_patch(src: Path) -> None:
    """Apply native/fake-quant.patch; a hunk that does not apply names its file."""
    check = subprocess.run(["git", "apply", "--check", "--verbose", str(PATCH)], cwd=src,
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise HarnessError(f"native patch {PATCH.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT[:12]}:\n"
                           + check.stderr.strip())
    subprocess.run(["git", "apply", str(PATCH)], cwd=src, check=True)


def _run_logged(cmd: list[str], cwd: Path, log: Path) -> None:
    # ccache (when installed) only speeds up rebuilds: BASEDIR makes the temporary paths relative
    env = dict(os.environ, CCACHE_BASEDIR=str(cwd), CCACHE_NOHASHDIR="1")
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("[") and ("/" in line.split("]")[0]):
                step, total = line[1:].split("]")[0].split("/")
                if int(step) % 25 == 0 or step == total:
                    progress(f"compiling {step}/{total}")
        failed = proc.wait() != 0
    if failed:  # read after the log is closed, so that its last lines are there
        tail = log.read_text().splitlines()[-40:]
        raise HarnessError(f"{cmd[0]} failed (full log: {log}):\n" + "\n".join(tail))


def build(backend: str = "cpu") -> Build:
    """Build the patched llama.cpp with the CPU and `backend`, or reuse the cached build with the same key."""
    fp = fingerprint(backend)
    final = cache_root() / "builds" / fp["key"]
    if not (final / "build-info.json").exists():
        _check_backend(backend)
        sdist = fetch_pypi(LLAMA_CPP_PYTHON)

        def make(tmp: Path) -> None:
            started = time.monotonic()
            src = _extract_llama_cpp(sdist, tmp / "src")
            apply_patch(src)
            log = tmp / "build.log"
            progress(f"configuring llama.cpp (key {fp['key']}; log {final / 'build.log'})")
            ccache = "-DGGML_CCACHE=" + ("ON" if shutil.which("ccache") else "OFF")
            try:
                _run_logged(["cmake", "-S", str(src), "-B", str(tmp / "build"), *fp["flags"].split(), ccache], tmp, log)
                progress(f"compiling llama.cpp with the {backend} backend (CPU only: about 4 minutes on 2 cores)")
                _run_logged(["cmake", "--build", str(tmp / "build"), "--target", "llama", *TOOLS], tmp, log)
            except HarnessError as err:  # keep the log: the temporary directory goes
                kept = final.parent / f"{final.name}.failed.log"
                shutil.copy(log, kept)
                raise HarnessError(str(err).replace(str(log), str(kept))) from None
            shutil.copytree(tmp / "build" / "bin", tmp / "bin", symlinks=True)
            for name in TOOLS:
                if not (tmp / "bin" / name).exists():
                    raise HarnessError(f"the build finished without {name}")
            shutil.rmtree(tmp / "src")
            shutil.rmtree(tmp / "build")
            info = dict(fp, backend=backend, build_seconds=f"{time.monotonic() - started:.1f}", ccache=ccache.endswith("ON"))
            (tmp / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")

        publish(final, make)
    return Build(bin_dir=final / "bin", fingerprint=fp)
