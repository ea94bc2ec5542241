"""Inputs of a measurement without llama.cpp: GGUF files checked before loading (truncated or
corrupt files named; metadata parsed once per file), corpus chunks and H5 prompts, and the
results-cache key's module list."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from harness.cache import HarnessError
from harness.corpus import TASKS_PER_KIND, arithmetic_tasks, cut_chunks, load_corpus, text_tasks
from harness.matrix import experiment_models, model_label
from harness import models
from harness.models import ModelFile, check_gguf, get_model, model_info


def tiny_gguf(path, file_type: int | None = LlamaFileType.MOSTLY_Q4_1, n_layer: int = 3):
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layer)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    writer.add_tensor("output.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("file_type", "weight_type"), [(LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
                                                        (LlamaFileType.ALL_F32, "F32"),
                                                        (LlamaFileType.MOSTLY_F16, "F16"), (None, "unknown")])
def test_gguf_metadata(tmp_path, file_type, weight_type):
    info = check_gguf(tiny_gguf(tmp_path / "m.gguf", file_type))
    assert (info.arch, info.n_layer, info.weight_type) == ("llama", 3, weight_type)


def test_model_info_is_read_once_per_file(tmp_path, monkeypatch):
    """A model's GGUF metadata are parsed once (seconds for a 262k vocabulary), then read from the cache."""
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path / "cache"))
    file = ModelFile("m", tiny_gguf(tmp_path / "m.gguf", LlamaFileType.ALL_F32), "ab" * 32)
    assert model_info(file) == check_gguf(file.path)
    monkeypatch.setattr(models, "check_gguf", lambda path: pytest.fail("parsed twice"))
    assert model_info(file).weight_type == "F32"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_gguf_is_named(tmp_path, keep):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:int(len(whole) * keep)])
    with pytest.raises(HarnessError, match=rf"{cut} is truncated"):
        check_gguf(cut)


def test_corrupt_gguf_is_named(tmp_path):
    data = bytearray(tiny_gguf(tmp_path / "m.gguf").read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # an absurd tensor count
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(HarnessError, match=rf"{bad} is truncated or corrupt"):
        check_gguf(bad)


def test_truncated_user_model_fails_at_resolution_and_collection(tmp_path, monkeypatch):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "mine.gguf"
    cut.write_bytes(whole[:-100])
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FQ_MODEL", str(cut))
    with pytest.raises(HarnessError, match=rf"{cut} is truncated"):
        get_model("user", None)  # what `python -m harness model user` resolves
    monkeypatch.setenv("FQ_EXPERIMENT_MODELS", "user")
    with pytest.raises(HarnessError, match=rf"{cut} is truncated"):
        experiment_models()  # what the experiment tests call at collection


def test_user_model_layer_count_and_label(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path / "tinyllama-q4.gguf", n_layer=7)
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FQ_MODEL", str(path))
    monkeypatch.setenv("FQ_EXPERIMENT_MODELS", f"user,smollm2-f32,{path}")
    assert experiment_models() == {"user": 7, "smollm2-f32": 30, str(path): 7}
    assert [model_label(n) for n in ("user", "smollm2-f32", str(path))] == ["tinyllama-q4", "smollm2-f32",
                                                                             "tinyllama-q4"]


def test_chunks_are_cut_like_llama_perplexity():
    tokens = list(range(100, 135))
    assert cut_chunks(tokens, 10, 3, bos=1) == [[1, *range(101, 110)], [1, *range(111, 120)], [1, *range(121, 130)]]
    assert cut_chunks(tokens, 10, 1, bos=None) == [list(range(100, 110))]
    with pytest.raises(HarnessError, match="gives 35 tokens: need 4 chunks of 10"):
        cut_chunks(tokens, 10, 4, bos=1)
    with pytest.raises(ValueError, match="n_ctx=1"):
        cut_chunks(tokens, 1, 1, bos=1)


def test_h5_prompts_are_many_distinct_and_deterministic():
    corpus = load_corpus()
    arithmetic, text = arithmetic_tasks(), text_tasks(corpus)
    assert len(arithmetic) == len(text) == TASKS_PER_KIND >= 100
    assert len(set(arithmetic)) == len(set(text)) == TASKS_PER_KIND
    assert arithmetic == arithmetic_tasks() and text == text_tasks(corpus)
    for question, answer in arithmetic:
        a, op, b = question.removeprefix("Q: What is ").removesuffix("?\nA:").split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
    assert all(context in s for context, s in [(c, c + cont) for c, cont in text]) and all(
        cont.startswith(" ") and cont.endswith(".") for _, cont in text)
