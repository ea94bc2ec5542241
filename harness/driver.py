"""Drive the patched libllama from Python: load a model, set or clear fake quantization on a
live context, get full-vocabulary logits for every position, generate, capture named tensors.

llama-cpp-python's ctypes bindings are used unchanged, pointed at the patched library through
LLAMA_CPP_LIB_PATH (read once, at import); the fake-quant functions the patch adds to llama.h
are bound here.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from harness.build import Build
from harness.cache import HarnessError

_llama = None  # the llama_cpp.llama_cpp module, bound to the patched library
_ggml_base = None
_ggml = None  # libggml: the backend registry


class FakeQuantError(ValueError):
    """A fake-quant setting libllama rejected; the message is libllama's."""


class StartRefused(HarnessError):
    """libllama would not start a graph at a layer (llama_fake_quant_start_at); the message says why."""


@dataclass(frozen=True)
class Start:
    """Start the next decode's graph at `layer`, from `residual`: the F32 values of l_out-<layer-1>
    that the whole graph computes for the same batch (n_embd per row, rows in order)."""

    layer: int
    residual: np.ndarray


EVERY_LAYER = "-1"  # the layer spec of a FakeQuantRule for every layer (as --fake-quant-tensor spells it)


@dataclass(frozen=True)
class FakeQuantRule:
    """Round `target` (a graph tensor name without its "-<layer>" suffix) to `fmt` and back."""

    target: str
    fmt: str
    layers: str = EVERY_LAYER
    scale: float = 1.0


def bind(build: Build):
    """Import llama_cpp against the patched library (once per process) and bind the additions."""
    global _llama, _ggml_base, _ggml
    if _llama is not None:
        return _llama
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin_dir)
    import llama_cpp.llama_cpp as llama  # noqa: PLC0415 - must follow LLAMA_CPP_LIB_PATH

    if Path(llama._base_path) != build.bin_dir:
        raise HarnessError(f"llama_cpp was already imported from {llama._base_path}, not {build.bin_dir}")
    lib = llama._lib
    lib.llama_fake_quant_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                         ctypes.c_float, ctypes.c_char_p, ctypes.c_size_t]
    lib.llama_fake_quant_add.restype = ctypes.c_int32
    lib.llama_fake_quant_clear.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.llama_fake_quant_clear.restype = ctypes.c_int32
    lib.llama_fake_quant_n_sites.argtypes = [ctypes.c_void_p]
    lib.llama_fake_quant_n_sites.restype = ctypes.c_int32
    lib.llama_fake_quant_n_applied.argtypes = [ctypes.c_void_p]
    lib.llama_fake_quant_n_applied.restype = ctypes.c_int64
    lib.llama_fake_quant_list.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.llama_fake_quant_list.restype = ctypes.c_int32
    lib.llama_fake_quant_start_at.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float),
                                              ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    lib.llama_fake_quant_start_at.restype = ctypes.c_int32
    lib.llama_fake_quant_n_skipped.argtypes = [ctypes.c_void_p]
    lib.llama_fake_quant_n_skipped.restype = ctypes.c_int32
    lib.llama_fake_quant_n_nodes.argtypes = [ctypes.c_void_p]
    lib.llama_fake_quant_n_nodes.restype = ctypes.c_int32
    lib.llama_fake_quant_formats.argtypes = []
    lib.llama_fake_quant_formats.restype = ctypes.c_char_p

    ggml = ctypes.CDLL(str(build.bin_dir / "libggml.so"))
    ggml.ggml_backend_dev_count.argtypes = []
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    base = ctypes.CDLL(str(build.bin_dir / "libggml-base.so"))
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.argtypes = [ctypes.c_void_p]
        fn.restype = ctypes.c_char_p
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                             ctypes.POINTER(ctypes.c_size_t)]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_get_name.argtypes = [ctypes.c_void_p]
    base.ggml_get_name.restype = ctypes.c_char_p
    base.ggml_get_data.argtypes = [ctypes.c_void_p]
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_nbytes.argtypes = [ctypes.c_void_p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    base.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    for fn in (base.ggml_backend_tensor_get, base.ggml_backend_tensor_set):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        fn.restype = None
    _ggml_base, _ggml = base, ggml

    llama.llama_log_set(_LOG_CALLBACK, None)
    llama.llama_backend_init()
    _llama = llama
    return llama


def fake_quant_formats(build: Build) -> tuple[str, ...]:
    """The format names the patched libllama accepts (llama_fake_quant_formats), in its order."""
    return tuple(bind(build)._lib.llama_fake_quant_formats().decode().split(", "))


_log_lines: list[str] = []


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _LOG_CALLBACK(level: int, text: bytes, _user: int) -> None:  # noqa: N802
    """Keep libllama's log quiet (FQ_VERBOSE=1 prints it) but remember the tail for errors."""
    line = text.decode(errors="replace")
    _log_lines.append(line)
    del _log_lines[:-200]
    if os.environ.get("FQ_VERBOSE"):
        print(line, end="", file=sys.stderr)


class _TensorHead(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


# the structs this module mirrors itself: (mirror, C struct, only its leading members); harness.abi
# checks them against the headers, with the bindings' own mirrors
MIRRORS = ((_TensorHead, "ggml_tensor", True),)
GGML_TYPE_F32 = 0
# enum ggml_backend_dev_type (ggml-backend.h)
DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}


@dataclass(frozen=True)
class Device:
    """A device ggml registered in this process (ggml_backend_dev_*): what the report names."""

    name: str          # "CPU", "CUDA0", "Vulkan0"
    description: str   # "NVIDIA H200", "llvmpipe (LLVM 15.0.6, 256 bits)"
    type: str          # DEVICE_TYPES
    memory_total_mib: float

    @property
    def gpu(self) -> bool:
        """A device llama.cpp offloads layers to by default (what makes a context's rules fixed after
        its first decode: native/README.md, Vulkan)."""
        return self.type in ("GPU", "IGPU")


def devices(build: Build) -> list[Device]:
    """Every device of the bound build, in registration order."""
    bind(build)
    base = _ggml_base
    out = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode(),
                          DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"), total.value / 2**20))
    return out


@dataclass(frozen=True)
class Target:
    """A name the computed graph gives to F32 activations (libllama's llama_fake_quant_list)."""

    graph: str                 # "pp": a batch of n_ctx tokens; "tg": one token
    name: str                  # as a rule's target: "ffn_norm", "result_output"
    layers: tuple[int, ...]    # the layers it appears at; () for a tensor of no layer
    shape: tuple[int, ...]     # ggml order (ne0, ne1, ...) of its first tensor
    count: int                 # tensors in the graph carrying the name


def _parse_layers(text: str) -> tuple[int, ...]:
    if text == "-":
        return ()
    out: list[int] = []
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)

class TensorHook(Protocol):
    """Sees computed graph tensors through libllama's eval callback (cb_eval)."""

    def wants(self, name: str) -> bool:
        """Whether to be called for the F32 tensor `name` (asked for every node)."""

    def __call__(self, name: str, data: np.ndarray) -> None:
        """A writable float32 view of the computed tensor, before later nodes read it."""


def default_threads() -> int:
    """`$FQ_THREADS`, else this process's share of the cores (set by conftest under xdist)."""
    return int(os.environ.get("FQ_THREADS", os.cpu_count() or 1))


class Model:
    """A loaded GGUF model: on the CPU, or with `n_gpu_layers` layers on the build's other backend."""

    def __init__(self, path: Path, build: Build, n_gpu_layers: int = 0) -> None:
        llama = bind(build)
        # llama.cpp's defaults, as the tools use them (load_mode AUTO: mmap where every device can)
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.path = path
        # with a GPU device every context gets its backend (whatever n_gpu_layers): its rules are then
        # fixed after the first decode, and Context.set_fake_quant renews the context to change them
        self.gpu = any(d.gpu for d in devices(build))
        self.ptr = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise HarnessError(f"libllama could not load {path}:\n{''.join(_log_lines[-5:])}")
        self.vocab = llama.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama.llama_model_n_layer(self.ptr)
        self.n_embd = llama.llama_model_n_embd(self.ptr)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        llama = _llama
        data = text.encode()
        n_max = len(data) + 16
        buf = (llama.llama_token * n_max)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, False)
        if n < 0:
            raise HarnessError(f"tokenization needs {-n} tokens, more than {n_max}")
        return list(buf[:n])

    def detokenize(self, tokens: Iterable[int]) -> str:
        llama = _llama
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for tok in tokens:
            n = llama.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode(errors="replace")

    @property
    def bos(self) -> int | None:
        """The BOS token when the model's tokenizer adds one, else None."""
        llama = _llama
        return int(llama.llama_vocab_bos(self.vocab)) if llama.llama_vocab_get_add_bos(self.vocab) else None

    def is_eog(self, token: int) -> bool:
        return bool(_llama.llama_vocab_is_eog(self.vocab, token))

    def context(self, n_ctx: int = 512, threads: int | None = None, tensor_hook: TensorHook | None = None,
                sequences: int = 1) -> Context:
        return Context(self, n_ctx, threads or default_threads(), tensor_hook, sequences)

    def close(self) -> None:
        if self.ptr:
            _llama.llama_model_free(self.ptr)
            self.ptr = None


class Context:
    """A llama_context with n_ctx positions per sequence, logits for every position: the handle
    (LiveContext), its fake-quant rules (FakeQuantSettings) and its decoding (Decoder), as one object.

    With `sequences` > 1 each sequence gets its own KV cache stream (kv_unified off), so a
    sequence's attention reads only its own cells: what one sequence computes cannot depend on
    what another holds (used by `generate_many`).

    With `tensor_hook`, libllama's eval callback hands each computed F32 tensor the hook wants
    to it (eval_callback)."""

    def __init__(self, model: Model, n_ctx: int, threads: int, tensor_hook: TensorHook | None,
                 sequences: int = 1) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.threads = threads
        self.sequences = sequences
        self.live = LiveContext(model, n_ctx, threads, tensor_hook, sequences)
        self.fake_quant = FakeQuantSettings(self.live)
        self.decoder = Decoder(self.live, n_ctx, sequences)

    # fake quantization ------------------------------------------------------------------

    def set_fake_quant(self, rules: Sequence[FakeQuantRule], renew: bool = True) -> None:
        """Replace the fake-quant rules (empty: off): FakeQuantSettings.set."""
        self.fake_quant.set(rules, renew)

    def fake_quant_targets(self) -> list[Target]:
        """The names fake quantization can target in this context's graphs, per graph."""
        return self.fake_quant.targets()

    @property
    def rules(self) -> tuple[FakeQuantRule, ...]:
        return self.fake_quant.rules

    @property
    def fake_quant_sites(self) -> int:
        """Tensors fake-quantized by the graph built last."""
        return self.fake_quant.sites

    @property
    def fake_quant_applied(self) -> int:
        """Tensor fake-quantizations computed since the context was created."""
        return self.fake_quant.applied

    @property
    def renewed(self) -> int:
        """Times set_fake_quant replaced the llama_context (GPU backends)."""
        return self.live.renewed

    # evaluation -------------------------------------------------------------------------

    @property
    def compute_seconds(self) -> float:
        """Wall time spent inside llama_decode."""
        return self.decoder.compute_seconds

    def logits(self, tokens: Sequence[int], first: int = 0, copy: bool = True, start: Start | None = None) -> np.ndarray:
        """Decoder.logits."""
        return self.decoder.logits(tokens, first, copy, start)

    @property
    def skipped_nodes(self) -> int:
        """Nodes the graph built last did not compute (a decode started at a layer)."""
        return _llama._lib.llama_fake_quant_n_skipped(self.live.ptr)

    @property
    def graph_nodes(self) -> int:
        """Nodes the graph built last computes."""
        return _llama._lib.llama_fake_quant_n_nodes(self.live.ptr)

    def generate(self, prompt: Sequence[int], n_predict: int, seed: int | None = None) -> list[int]:
        """Greedy continuation (seed None) or seeded sampling with llama-completion's default
        chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8, then draw with `seed`)."""
        return self.decoder.generate_many([prompt], n_predict, [seed])[0]

    def generate_many(self, prompts: Sequence[Sequence[int]], n_predict: int,
                      seeds: Sequence[int | None]) -> list[list[int]]:
        """Decoder.generate_many."""
        return self.decoder.generate_many(prompts, n_predict, seeds)

    def close(self) -> None:
        if self.live.ptr:
            self.decoder.close()
            self.live.close()


class LiveContext:
    """The llama_context itself: made from fixed parameters, renewed (a fresh one with the same
    parameters and tensor hook), freed. `computed`: whether it has decoded since it was made."""

    def __init__(self, model: Model, n_ctx: int, threads: int, tensor_hook: TensorHook | None,
                 sequences: int) -> None:
        self.model = model
        self.params = params = _llama.llama_context_default_params()
        params.n_ctx = n_ctx * sequences
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = sequences
        params.kv_unified = False
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        self._callback = None  # kept referenced while libllama may call it
        if tensor_hook is not None:
            self._callback = eval_callback(tensor_hook)
            params.cb_eval = self._callback
            params.cb_eval_user_data = None
        self.renewed = 0
        self._open()

    def _open(self) -> None:
        self.ptr = _llama.llama_init_from_model(self.model.ptr, self.params)
        if not self.ptr:
            raise HarnessError(f"libllama could not create a context:\n{''.join(_log_lines[-5:])}")
        self.memory = _llama.llama_get_memory(self.ptr)
        self.computed = False

    def renew(self) -> None:
        _llama.llama_free(self.ptr)
        self.ptr = None
        self._open()
        self.renewed += 1

    def close(self) -> None:
        _llama.llama_free(self.ptr)
        self.ptr = None


def eval_callback(hook: TensorHook):
    """libllama's eval callback for `hook`: each computed F32 tensor the hook wants, as a writable
    array (its strides, views included), before later nodes read it, so the hook may capture it or
    change it in place. Host memory is handed over directly; a tensor in device memory is read with
    ggml_backend_tensor_get and written back with ggml_backend_tensor_set."""
    base = _ggml_base

    def callback(tensor: int, ask: bool, _user: int) -> bool:
        name = base.ggml_get_name(tensor).decode()
        if not hook.wants(name):
            return False
        head = _TensorHead.from_address(tensor)
        if head.type != GGML_TYPE_F32:
            return False
        if ask:
            return True
        nbytes = base.ggml_nbytes(tensor)
        on_host = bool(head.buffer) and base.ggml_backend_buffer_is_host(head.buffer)
        if on_host:
            raw = (ctypes.c_char * nbytes).from_address(base.ggml_get_data(tensor))
        else:
            raw = ctypes.create_string_buffer(nbytes)
            base.ggml_backend_tensor_get(tensor, raw, 0, nbytes)
        shape = tuple(int(n) for n in reversed(head.ne))  # numpy order: ne3, ne2, ne1, ne0
        strides = tuple(int(n) for n in reversed(head.nb))
        data = np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32), shape, strides)
        hook(name, data.reshape(shape[2:]) if shape[:2] == (1, 1) else data)
        if not on_host:
            base.ggml_backend_tensor_set(tensor, raw, 0, nbytes)
        return True

    return _llama.ggml_backend_sched_eval_callback(callback)


class FakeQuantSettings:
    """The fake-quant rules of a live context (the llama_fake_quant_* functions the patch adds)."""

    def __init__(self, live: LiveContext) -> None:
        self.live = live
        self.rules: tuple[FakeQuantRule, ...] = ()

    def set(self, rules: Sequence[FakeQuantRule], renew: bool = True) -> None:
        """Replace the fake-quant rules (empty: off). A rejected rule leaves the context off.

        With a GPU backend, libllama refuses to change the rules once the context has computed a
        graph (native/README.md, Vulkan); then, unless `renew` is False, the llama_context is
        replaced by a fresh one with the same parameters (and tensor hook) and the rules are set on
        it before its first decode. Every evaluation here starts from an empty KV cache, so nothing
        else changes. On the CPU the rules change on the live context, as before."""
        lib = _llama._lib
        live = self.live
        if renew and live.model.gpu and live.computed and (rules or self.rules):
            live.renew()
            self.rules = ()
        err = ctypes.create_string_buffer(8192)
        if lib.llama_fake_quant_clear(live.ptr, err, len(err)) != 0:
            raise FakeQuantError(err.value.decode())
        self.rules = ()
        for rule in rules:
            rc = lib.llama_fake_quant_add(live.ptr, rule.target.encode(), rule.fmt.encode(), rule.layers.encode(),
                                          float(rule.scale), err, len(err))
            if rc != 0:
                lib.llama_fake_quant_clear(live.ptr, None, 0)
                raise FakeQuantError(err.value.decode())
        self.rules = tuple(rules)

    def targets(self) -> list[Target]:
        """The names fake quantization can target in the context's graphs, per graph."""
        lib = _llama._lib
        n = lib.llama_fake_quant_list(self.live.ptr, None, 0)
        buf = ctypes.create_string_buffer(max(n, 0) + 1 if n >= 0 else 1024)
        if lib.llama_fake_quant_list(self.live.ptr, buf, len(buf)) < 0:
            raise FakeQuantError(buf.value.decode())
        out = []
        for line in buf.value.decode().splitlines():
            graph, name, layers, shape, count = line.split("\t")
            out.append(Target(graph, name, _parse_layers(layers), tuple(int(d) for d in shape.split("x")), int(count)))
        return out

    @property
    def sites(self) -> int:
        """Tensors fake-quantized by the graph built last."""
        return _llama._lib.llama_fake_quant_n_sites(self.live.ptr)

    @property
    def applied(self) -> int:
        """Tensor fake-quantizations computed since the llama_context was made."""
        return _llama._lib.llama_fake_quant_n_applied(self.live.ptr)


class Decoder:
    """Decoding on a live context: logits for every position, greedy or sampled generation of one
    or several sequences; `compute_seconds` is the wall time spent inside llama_decode."""

    def __init__(self, live: LiveContext, n_ctx: int, sequences: int) -> None:
        self.live = live
        self.model = live.model
        self.n_ctx = n_ctx
        self.sequences = sequences
        self.batch = _llama.llama_batch_init(max(n_ctx, sequences), 0, 1)
        self.compute_seconds = 0.0
        self.start_layer = 0  # where libllama starts the graph (llama_fake_quant_start_at)

    def _start(self, start: Start | None) -> None:
        """Tell libllama where the next decode's graph starts (None: the whole graph)."""
        layer = start.layer if start else 0
        if layer == 0 and self.start_layer == 0:
            return
        err = ctypes.create_string_buffer(2048)
        if start is None:
            rc = _llama._lib.llama_fake_quant_start_at(self.live.ptr, 0, None, 0, err, len(err))
        else:
            resid = np.ascontiguousarray(start.residual, dtype=np.float32)
            rc = _llama._lib.llama_fake_quant_start_at(self.live.ptr, layer, resid.ctypes.data_as(
                ctypes.POINTER(ctypes.c_float)), resid.size, err, len(err))
        if rc != 0:
            raise StartRefused(err.value.decode())
        self.start_layer = layer

    def _decode(self, tokens: Sequence[int], start: int | Sequence[int], first_output: int, seq: int = 0) -> None:
        """Decode `tokens`, with logits for batch rows first_output..: in sequence `seq` at
        positions start.., or (start a list) token i in sequence i at position start[i]."""
        llama = _llama
        batch = self.batch
        n = len(tokens)
        one_sequence = isinstance(start, int)
        positions = range(start, start + n) if one_sequence else start
        if max(positions) + 1 > self.n_ctx:
            raise HarnessError(f"{max(positions) + 1} positions exceed the context size {self.n_ctx}")
        for i, (tok, pos) in enumerate(zip(tokens, positions, strict=True)):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq if one_sequence else i
            batch.logits[i] = i >= first_output
        batch.n_tokens = n
        started = time.perf_counter()
        rc = llama.llama_decode(self.live.ptr, batch)
        self.compute_seconds += time.perf_counter() - started
        self.live.computed = True
        if rc != 0:
            raise HarnessError(f"llama_decode failed ({rc}):\n{''.join(_log_lines[-5:])}")

    def logits(self, tokens: Sequence[int], first: int = 0, copy: bool = True, start: Start | None = None) -> np.ndarray:
        """Fresh sequence: float32 logits [len(tokens) - first, n_vocab] of positions first..
        (only those are computed through the output layer). copy=False returns a view of
        libllama's buffer, valid until the next decode on this context. With `start`, the graph
        starts at its layer (StartRefused if libllama will not, at once or in the decode)."""
        _llama.llama_memory_clear(self.live.memory, True)
        self._start(start)
        try:
            self._decode(tokens, 0, first)
        except HarnessError as exc:
            if self.start_layer == 0:
                raise
            self._start(None)
            why = [line.split(": ", 1)[1].strip() for line in _log_lines[-20:] if line.startswith("process_ubatch: ")]
            raise StartRefused(why[-1] if why else str(exc)) from None
        ptr = _llama.llama_get_logits(self.live.ptr)
        view = np.ctypeslib.as_array(ptr, shape=(len(tokens) - first, self.model.n_vocab))
        return view.copy() if copy else view

    def generate_many(self, prompts: Sequence[Sequence[int]], n_predict: int,
                      seeds: Sequence[int | None]) -> list[list[int]]:
        """`generate` for each prompt, decoded together: each prompt is evaluated alone in its own
        sequence, then each step decodes the next token of every sequence in one batch. A sequence
        that has ended keeps being fed, so the batch (and the kernels it selects) stays the same
        whenever the others end: with a KV stream per sequence, each continuation's bits depend on
        its own prompt and on how many prompts share the batch, not on the other prompts."""
        llama = _llama
        if not 0 < len(prompts) <= self.sequences or len(seeds) != len(prompts):
            raise HarnessError(f"{len(prompts)} prompts and {len(seeds)} seeds for a context of "
                               f"{self.sequences} sequences (one seed or None per prompt)")
        llama.llama_memory_clear(self.live.memory, True)
        self._start(None)
        chains = [self._sampler(seed) for seed in seeds]
        outs: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        try:
            step_tokens = []
            for i, prompt in enumerate(prompts):
                self._decode(prompt, 0, len(prompt) - 1, seq=i)
                step_tokens.append(self._pick(chains[i], -1))
            for step in range(n_predict):
                for i, tok in enumerate(step_tokens):
                    ended[i] = ended[i] or self.model.is_eog(tok)
                    if not ended[i]:
                        outs[i].append(tok)
                if all(ended) or step == n_predict - 1:
                    break
                self._decode(step_tokens, [len(p) + step for p in prompts], 0)
                step_tokens = [self._pick(chain, i) for i, chain in enumerate(chains)]
        finally:
            for chain in chains:
                if chain is not None:
                    llama.llama_sampler_free(chain)
        return outs

    @staticmethod
    def _sampler(seed: int | None):
        """llama-completion's default sampling chain drawing with `seed`; None: greedy (argmax)."""
        if seed is None:
            return None
        llama = _llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        for s in (llama.llama_sampler_init_top_k(40), llama.llama_sampler_init_top_p(0.95, 1),
                  llama.llama_sampler_init_min_p(0.05, 1), llama.llama_sampler_init_temp(0.8),
                  llama.llama_sampler_init_dist(seed)):
            llama.llama_sampler_chain_add(chain, s)
        return chain

    def _pick(self, chain, row: int) -> int:
        """The next token from the logits of output row `row` (-1: the last)."""
        if chain is not None:
            return int(_llama.llama_sampler_sample(chain, self.live.ptr, row))
        logits = _llama.llama_get_logits_ith(self.live.ptr, row)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.model.n_vocab,))))

    def close(self) -> None:
        _llama.llama_batch_free(self.batch)
