"""Evaluation text and prompts.

Default corpus: CPython's own documentation topics (`pydoc_data.topics`, ~465k characters of
English prose and code), which ship with every Python, so nothing is downloaded. A user text
file can replace it (`FQ_CORPUS=path`).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from harness.cache import HarnessError

CORPUS_ENV = "FQ_CORPUS"

# the design's prompt ("test prompt"), then free text and arithmetic, for greedy generation
GENERATION_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("design", "text", "測試提示"),
    ("story", "text", "Once upon a time, in a small village by the sea,"),
    ("science", "text", "The three laws of thermodynamics state that"),
    ("python", "text", "In Python, a list comprehension is"),
    ("add", "arithmetic", "Q: What is 47 + 38?\nA:"),
    ("mul", "arithmetic", "Q: What is 12 * 9?\nA:"),
    ("word", "arithmetic", "Tom has 5 apples and buys 7 more. How many apples does he have now? Answer:"),
)
SEEDED_PROMPT = ("design_seed42", "text", "測試提示")  # the design's `-n 50 --seed 42` scenario


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str


def load_corpus() -> Corpus:
    """`$FQ_CORPUS` (a UTF-8 text file) or the CPython documentation topics."""
    if path := os.environ.get(CORPUS_ENV):
        file = Path(path)
        if not file.is_file():
            raise HarnessError(f"${CORPUS_ENV}={path}: no such file")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise HarnessError(f"${CORPUS_ENV}={path} is not UTF-8 text: {exc}") from None
        name = file.name
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        name = "pydoc_data.topics"
    return Corpus(name, text, hashlib.sha256(text.encode()).hexdigest())


TASKS_PER_KIND = 100  # H5 compares per-prompt mean KLD: 100 prompts of each kind


def arithmetic_tasks(n: int = TASKS_PER_KIND, seed: int = 1234) -> list[tuple[str, str]]:
    """(question, answer) pairs: distinct sums and products of small integers, alternating,
    fixed by the seed."""
    if n < 1:
        raise ValueError(f"need at least 1 arithmetic task, got n={n}")
    rng = random.Random(seed)
    tasks: dict[str, str] = {}
    while len(tasks) < n:
        add = len(tasks) % 2 == 0
        a, b = rng.randint(11, 99), rng.randint(2, 99 if add else 12)
        op, value = ("+", a + b) if add else ("*", a * b)
        tasks.setdefault(f"Q: What is {a} {op} {b}?\nA:", f" {value}")
    return list(tasks.items())


def text_tasks(corpus: Corpus, n: int = TASKS_PER_KIND, skip_chars: int = 300_000) -> list[tuple[str, str]]:
    """(context, continuation) pairs: n distinct sentences of the corpus beyond the evaluated
    slice, evenly spaced, each cut in half at a word boundary."""
    if n < 1:
        raise ValueError(f"need at least 1 text task, got n={n}")
    sentences = [" ".join(s.split()) for s in corpus.text[skip_chars:].split(". ")]
    sentences = list(dict.fromkeys(s for s in sentences if 60 <= len(s) <= 160 and s.isascii() and len(s.split()) >= 8))
    if len(sentences) < n:
        raise HarnessError(f"corpus {corpus.name} has {len(sentences)} usable sentences beyond character "
                           f"{skip_chars}, too few for {n} text tasks")
    step = len(sentences) // n
    tasks = []
    for words in (sentences[i * step].split() for i in range(n)):
        half = len(words) // 2
        tasks.append((" ".join(words[:half]), " " + " ".join(words[half:]) + "."))
    return tasks


def cut_chunks(tokens: list[int], n_ctx: int, n_chunks: int, bos: int | None) -> list[list[int]]:
    """The first n_chunks chunks of n_ctx tokens, as llama-perplexity cuts them: consecutive
    slices of the text tokenized once, the first token of each replaced by BOS (when the model has one)."""
    if n_ctx < 2 or n_chunks < 1:
        raise ValueError(f"need n_ctx >= 2 and n_chunks >= 1, got n_ctx={n_ctx}, n_chunks={n_chunks}")
    if len(tokens) < n_ctx * n_chunks:
        raise HarnessError(f"the corpus gives {len(tokens)} tokens: need {n_chunks} chunks of {n_ctx}")
    chunks = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n_chunks)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks
