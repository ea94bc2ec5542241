"""Token-distribution statistics comparing a baseline model with a fake-quantized one.

These are the statistics ``llama-perplexity --kl-divergence`` prints (KL divergence
percentiles, top-1 agreement, perplexities, change in the target token's probability),
recomputed here from full logits in float64 so the suite does not depend on llama.cpp's
own float32 accumulation.  Logits are processed in row blocks so the float64
temporaries stay bounded however many tokens are scored.  Intervals and verdicts are
harness.intervals' job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK_ROWS = 16  # rows per float64 pass: small enough to stay in cache (5x faster than 256)
"""Default number of logit rows converted to float64 at a time."""

@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics; every field is a 1-D array of length ``n_tokens``."""

    kld: np.ndarray  # float64, KL(base || test) in nats
    top1: np.ndarray  # bool, argmax(base) == argmax(test)
    nll_base: np.ndarray  # float64, -log p_base(target)
    nll_test: np.ndarray  # float64, -log p_test(target)
    dp: np.ndarray  # float64, p_test(target) - p_base(target)

    def __post_init__(self) -> None:
        n = len(self.kld)
        for name in ("kld", "top1", "nll_base", "nll_test", "dp"):
            arr = getattr(self, name)
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"{name} must be 1-D of length {n}, got shape {arr.shape}")

    def __len__(self) -> int:
        return len(self.kld)

    @classmethod
    def concat(cls, parts: Sequence[TokenStats]) -> TokenStats:
        """Concatenate the statistics of several chunks, in order."""
        if not parts:
            empty = np.empty(0, dtype=np.float64)
            return cls(empty, np.empty(0, dtype=bool), empty, empty, empty)
        return cls(
            kld=np.concatenate([p.kld for p in parts]),
            top1=np.concatenate([p.top1 for p in parts]),
            nll_base=np.concatenate([p.nll_base for p in parts]),
            nll_test=np.concatenate([p.nll_test for p in parts]),
            dp=np.concatenate([p.dp for p in parts]),
        )


def _shifted(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows in float64 minus their max, exp of that, and its row sums (log-sum-exp parts)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return x, e, e.sum(axis=1)


def token_stats(
    base_logits: np.ndarray,
    test_logits: np.ndarray,
    targets: np.ndarray,
    *,
    block_rows: int = BLOCK_ROWS,
) -> TokenStats:
    """Per-token KLD, top-1 agreement, NLLs and target-probability change.

    ``base_logits`` and ``test_logits`` are ``[n_tokens, n_vocab]`` logits for the
    positions whose next token is ``targets[i]``.
    """
    base_logits = np.asarray(base_logits)
    test_logits = np.asarray(test_logits)
    targets = np.asarray(targets)
    if base_logits.ndim != 2 or base_logits.shape != test_logits.shape:
        raise ValueError(
            f"logits must be 2-D with equal shapes, got {base_logits.shape} and {test_logits.shape}"
        )
    n, n_vocab = base_logits.shape
    if targets.shape != (n,) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be an integer array of shape ({n},), got {targets.dtype} {targets.shape}")
    if n and (targets.min() < 0 or targets.max() >= n_vocab):
        raise ValueError(f"targets out of range [0, {n_vocab})")
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")

    parts = []
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        b, t = base_logits[rows], test_logits[rows]
        if not (np.isfinite(b).all() and np.isfinite(t).all()):
            raise ValueError(f"non-finite logits in rows {start}..{start + len(b) - 1}")
        # KLD = sum p_b (log p_b - log p_t) = [sum e_b (x_b - x_t)] / s_b - log s_b + log s_t with
        # x max-shifted rows, e = exp(x), s = sum(e): one fused product instead of two log-softmaxes
        xb, eb, sb = _shifted(b)
        xt, _, st = _shifted(t)
        idx = np.arange(len(b))
        tgt = targets[rows]
        lb = xb[idx, tgt] - np.log(sb)
        lt = xt[idx, tgt] - np.log(st)
        xb -= xt
        kld = np.einsum("ij,ij->i", eb, xb) / sb - np.log(sb) + np.log(st)
        parts.append(
            TokenStats(
                kld=kld,
                top1=b.argmax(axis=1) == t.argmax(axis=1),
                nll_base=-lb,
                nll_test=-lt,
                dp=np.exp(lt) - np.exp(lb),
            )
        )
    return TokenStats.concat(parts)


def summarize(stats: TokenStats) -> dict[str, float]:
    """Aggregate statistics in the style of ``llama-perplexity --kl-divergence``."""
    n = len(stats)
    if n == 0:
        raise ValueError("cannot summarize zero tokens")
    p999, p99, p95, p90, p50 = np.percentile(stats.kld, [99.9, 99, 95, 90, 50], method="linear")
    ln_ratio = float(np.mean(stats.nll_test - stats.nll_base))
    return {
        "n_tokens": n,
        "kld_mean": float(np.mean(stats.kld)),
        "kld_max": float(np.max(stats.kld)),
        "kld_p99_9": float(p999),
        "kld_p99": float(p99),
        "kld_p95": float(p95),
        "kld_p90": float(p90),
        "kld_median": float(p50),
        "top1_agreement": float(np.mean(stats.top1)),
        "ppl_base": math.exp(float(np.mean(stats.nll_base))),
        "ppl_test": math.exp(float(np.mean(stats.nll_test))),
        "ln_ppl_ratio": ln_ratio,
        "ppl_ratio": math.exp(ln_ratio),
        "dp_mean": float(np.mean(stats.dp)),
        "dp_rms": math.sqrt(float(np.mean(np.square(stats.dp)))),
    }


def generation_match(base_tokens: Sequence[int], test_tokens: Sequence[int]) -> dict[str, Any]:
    """Compare two generated token sequences.

    ``first_divergence`` is the first index where they differ (the shorter length if one
    is a prefix of the other) or None when they are equal; ``match_rate`` is the fraction
    of the ``max(len)`` positions where both have the same token (1.0 for two empty).
    """
    base, test = list(base_tokens), list(test_tokens)
    longest = max(len(base), len(test))
    if base == test:
        return {"first_divergence": None, "match_rate": 1.0}
    equal = [x == y for x, y in zip(base, test)]
    first = equal.index(False) if False in equal else len(equal)
    return {"first_divergence": first, "match_rate": sum(equal) / longest}
