"""Build the patched llama.cpp: pinned source → verified → patched → CMake/Ninja, cached by key.

The key hashes everything that decides the bits of the result: the sdist, the patch, the CMake
flags (CPU features pinned, never -march=native; CUDA architectures named) and the compiler. One
compile per key, ever; concurrent callers wait on a lock; a half-finished build is never published.
The source is the pinned sdist or a verified trimmed tree of it (harness.source): the same bits,
so the same key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness import source as sources
from harness.cache import HarnessError, cache_root, progress, publish, sha256_file
from harness.pins import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON

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
# lavapipe (a CPU Vulkan driver); CUDA's architectures are added by fingerprint() (docs/gpu.md).
BACKEND_FLAGS = {"cpu": (), "vulkan": ("-DGGML_VULKAN=ON",), "cuda": ("-DGGML_CUDA=ON",)}
# what each backend's build needs on the build machine: (file or program, Debian package)
BACKEND_NEEDS = {
    "vulkan": (("/usr/include/vulkan/vulkan.hpp", "libvulkan-dev"), ("glslc", "glslc"),
               ("/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake", "spirv-headers")),
    "cuda": (("nvcc", "nvidia-cuda-toolkit"),),
}
CUDA_ROOTS = ("/usr/local/cuda", "/usr")  # where a CUDA toolkit's include/ is looked for, beside nvcc's
CUDA_ARCH_ENV = "FQ_CUDA_ARCHITECTURES"
# CMake's CUDA_ARCHITECTURES entries: 90, 90-real, 86-virtual, 120a-real, all, all-major ("native" is
# resolved here instead, so that the key names the architectures)
_CUDA_ARCH = re.compile(r"all|all-major|\d+[af]?(-real|-virtual)?")


@dataclass(frozen=True)
class Build:
    """A finished build: tools and shared libraries side by side in `bin_dir`."""

    bin_dir: Path
    fingerprint: dict[str, str]
    backend: str = "cpu"  # the backend built beside the CPU's

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


BACKEND_ENV, GPU_LAYERS_ENV = "FQ_BACKEND", "FQ_GPU_LAYERS"
ALL_LAYERS = 999  # n_gpu_layers that offloads every layer and the output


def offload(backend: str | None = None, gpu_layers: int | None = None) -> tuple[str, int]:
    """The backend to run on and the layers to offload to its device: the arguments, else $FQ_BACKEND
    and $FQ_GPU_LAYERS, else the CPU. A GPU backend offloads every layer (ALL_LAYERS) unless told
    how many; the CPU offloads none."""
    name = backend or os.environ.get(BACKEND_ENV) or "cpu"
    if name not in BACKEND_FLAGS:
        origin = "" if backend else f"${BACKEND_ENV}="
        raise HarnessError(f"unknown backend {origin}{name!r} (allowed: {', '.join(BACKEND_FLAGS)})")
    if gpu_layers is None and (text := os.environ.get(GPU_LAYERS_ENV, "").strip()):
        try:
            gpu_layers = int(text)
        except ValueError:
            raise HarnessError(f"${GPU_LAYERS_ENV}={text!r} is not a layer count (an integer >= 0)") from None
    if gpu_layers is None:
        gpu_layers = 0 if name == "cpu" else ALL_LAYERS
    if gpu_layers < 0:
        raise HarnessError(f"gpu layers {gpu_layers} is negative (allowed: 0 up to the model's layers; "
                           f"{ALL_LAYERS} offloads every layer)")
    if name == "cpu" and gpu_layers:
        raise HarnessError(f"gpu layers {gpu_layers} needs a GPU backend (vulkan or cuda): the cpu backend offloads "
                           "nothing")
    return name, gpu_layers


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
    if backend == "cuda":  # ggml-cuda links cuBLAS, which a bare nvcc (e.g. from pip) does not bring
        roots = [Path(shutil.which("nvcc") or "nvcc").resolve().parent.parent, *map(Path, CUDA_ROOTS)]
        roots += [Path(os.environ[v]) for v in ("CUDA_PATH", "CUDA_HOME", "CUDAToolkit_ROOT") if os.environ.get(v)]
        includes = [d for root in roots for d in (root / "include", *root.glob("targets/*/include"))]
        if not any((d / "cublas_v2.h").exists() for d in includes):
            raise HarnessError("building the cuda backend needs cuBLAS: no cublas_v2.h in "
                               f"{', '.join(sorted({str(d) for d in includes}))} (install the CUDA toolkit with "
                               "libcublas, e.g. cuda-toolkit or libcublas-dev, or set CUDA_PATH)")


def _cuda_device_query() -> tuple[list[int], str]:
    """Compute capabilities of this machine's GPUs (as 90 for 9.0), and what was asked: CUDA's own
    __nvcc_device_query (what CMake's and nvcc's "native" use), else nvidia-smi."""
    tried = []
    nvcc = shutil.which("nvcc")
    queries = [shutil.which("__nvcc_device_query")] + ([str(Path(nvcc).resolve().parent / "__nvcc_device_query")]
                                                       if nvcc else [])
    for query in dict.fromkeys(filter(None, queries)):
        proc = subprocess.run([query], capture_output=True, text=True)
        tried.append(f"{query}: exit {proc.returncode} {(proc.stdout + proc.stderr).strip()[:200]}")
        if proc.returncode == 0 and (found := [int(a) for a in re.findall(r"\d+", proc.stdout)]):
            return found, query
    if smi := shutil.which("nvidia-smi"):
        proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
        tried.append(f"nvidia-smi: exit {proc.returncode} {(proc.stdout + proc.stderr).strip()[:200]}")
        if proc.returncode == 0 and (found := [int(a + b) for a, b in re.findall(r"(\d+)\.(\d+)", proc.stdout)]):
            return found, "nvidia-smi"
    return [], "; ".join(tried) or "neither __nvcc_device_query nor nvidia-smi is installed"


@functools.cache
def cuda_architectures() -> tuple[str, str]:
    """CMAKE_CUDA_ARCHITECTURES for a CUDA build and where it came from: $FQ_CUDA_ARCHITECTURES, else
    the GPUs of the build machine, each as real code only (90-real on an H100/H200: one architecture,
    not llama.cpp's portable list of seven)."""
    value = os.environ.get(CUDA_ARCH_ENV, "").strip()
    if value:
        items = [v for v in re.split(r"[;,\s]+", value) if v]
        bad = [v for v in items if not _CUDA_ARCH.fullmatch(v)]
        if bad or not items:
            raise HarnessError(f"{CUDA_ARCH_ENV}={value!r}: {', '.join(map(repr, bad)) or 'empty'} is not a CUDA "
                               "architecture (allowed: e.g. 90-real, 86, 89-real;90-virtual, 120a-real, all-major)")
        return ";".join(items), f"${CUDA_ARCH_ENV}"
    found, how = _cuda_device_query()
    if not found:
        raise HarnessError(f"no CUDA GPU detected on this machine to choose the architectures to build ({how}): "
                           f"set {CUDA_ARCH_ENV}, e.g. 90-real for an H100/H200, or all-major")
    return ";".join(f"{arch}-real" for arch in sorted(set(found))), f"detected on this machine by {Path(how).name}"


def fingerprint(backend: str = "cpu") -> dict[str, str]:
    """What went into the build; `key` names its cache directory."""
    if not PATCH.exists():
        raise HarnessError(f"the native patch is missing: {PATCH}")
    if backend not in BACKEND_FLAGS:
        raise HarnessError(f"unknown backend {backend!r} (allowed: {', '.join(BACKEND_FLAGS)})")
    flags = list(CMAKE_FLAGS + BACKEND_FLAGS[backend])
    if backend == "cuda":
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()[0]}")
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


def apply_patch(src: Path, include: tuple[str, ...] = ()) -> None:
    """Apply native/fake-quant.patch (only its files under `include`, when given); a hunk that does
    not apply names its file."""
    # git apply inside another repository's work tree would patch paths relative to that repository:
    # never look above the source tree for one
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(src.parent))
    only = [f"--include={d}/*" for d in include]
    check = subprocess.run(["git", "apply", "--check", "--verbose", *only, str(PATCH)], cwd=src,
                           capture_output=True, text=True, env=env)
    if check.returncode != 0:
        raise HarnessError(f"native patch {PATCH.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT[:12]}:\n"
                           + check.stderr.strip())
    subprocess.run(["git", "apply", *only, str(PATCH)], cwd=src, check=True, env=env)


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
        source = sources.locate()
        if backend == "cuda":
            arch, how = cuda_architectures()
            progress(f"CUDA architectures {arch} ({how}; ${CUDA_ARCH_ENV} overrides)")

        def make(tmp: Path) -> None:
            started = time.monotonic()
            src = sources.extract(source, tmp / "src")
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
            info = dict(fp, backend=backend, build_seconds=f"{time.monotonic() - started:.1f}", ccache=ccache.endswith("ON"),
                        source=f"{source.kind} {source.path}")
            (tmp / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")

        publish(final, make)
    return Build(bin_dir=final / "bin", fingerprint=fp, backend=backend)
