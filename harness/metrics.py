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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.records import TokenSummary

BLOCK_ROWS = 2
"""Logit rows converted to float64 at a time. Fewer rows stay in cache: on 447 rows, one thread,
2 rows took 0.55 s on Gemma 3's vocabulary (262,144) and 0.10 s on SmolLM2's (49,152), 16 rows
0.73 s and 0.12 s (`python -m harness bench --token-stats`, medians of 5)."""

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


class _Workspace:
    """Four float64 ``[rows, n_vocab]`` buffers reused for every block of a span.

    A fresh float64 array per block costs page faults on every allocation (numpy hands large
    arrays back to the OS): on Gemma 3's 262,144-entry rows, converting 16 rows to float64 took
    8.2 ms into a new array and 1.4 ms into a reused one, exp 8.8 vs 4.8 ms. The arithmetic is
    the same, so the bits are too. At least two rows: see _row_dots."""

    def __init__(self, rows: int, n_vocab: int) -> None:
        self.xb, self.eb, self.xt, self.et = (np.zeros((max(2, rows), n_vocab)) for _ in range(4))


def _row_dots(e: np.ndarray, x: np.ndarray, m: int) -> np.ndarray:
    """sum_j e[i, j] * x[i, j] for the first m rows of two workspace buffers.

    np.einsum sums a single row in another order than the rows of a larger array (the bits
    differ), so a lone row is summed beside a second row of the buffers and every row gets
    the same bits whatever block it falls in."""
    return np.einsum("ij,ij->i", e[:max(2, m)], x[:max(2, m)])[:m]


def _block_stats(b: np.ndarray, t: np.ndarray, tgt: np.ndarray, start: int, ws: _Workspace) -> TokenStats:
    """One block of rows. KLD = sum p_b (log p_b - log p_t) = [sum e_b (x_b - x_t)] / s_b - log s_b
    + log s_t with x the rows in float64 minus their max, e = exp(x), s = sum(e): one fused
    product instead of two log-softmaxes.

    Each pass over a row counts (Gemma 3's rows have 262,144 entries), so the rows' maxima are read
    at their argmax (needed for top-1 anyway) and finiteness is checked on what the arithmetic
    gives, not by two passes of isfinite: a NaN or +inf is its row's argmax, so the maximum is not
    finite; a -inf in a finite row makes the KLD non-finite (0 * -inf in the base row, an infinite
    or NaN term in the test row); finite rows give finite maxima and KLDs. So the check below
    refuses exactly the blocks with a non-finite logit."""
    m = len(b)
    idx = np.arange(m)
    arg_b, arg_t = b.argmax(axis=1), t.argmax(axis=1)
    max_b, max_t = b[idx, arg_b], t[idx, arg_t]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are refused below
        # the rows cast to float64, then their max subtracted (exact in float64): the bits of a
        # mixed-type subtract at about half its cost
        xb, xt = ws.xb[:m], ws.xt[:m]
        np.copyto(xb, b)
        np.copyto(xt, t)
        xb -= max_b[:, None].astype(np.float64)
        xt -= max_t[:, None].astype(np.float64)
        eb = np.exp(xb, out=ws.eb[:m])
        sb, st = eb.sum(axis=1), np.exp(xt, out=ws.et[:m]).sum(axis=1)
        lb = xb[idx, tgt] - np.log(sb)
        lt = xt[idx, tgt] - np.log(st)
        xb -= xt
        kld = _row_dots(ws.eb, ws.xb, m) / sb - np.log(sb) + np.log(st)
    if not (np.isfinite(max_b).all() and np.isfinite(max_t).all() and np.isfinite(kld).all()):
        raise ValueError(f"non-finite logits in rows {start}..{start + m - 1}")
    return TokenStats(kld=kld, top1=arg_b == arg_t, nll_base=-lb, nll_test=-lt, dp=np.exp(lt) - np.exp(lb))


def token_stats(
    base_logits: np.ndarray,
    test_logits: np.ndarray,
    targets: np.ndarray,
    *,
    block_rows: int = BLOCK_ROWS,
    threads: int = 1,
) -> TokenStats:
    """Per-token KLD, top-1 agreement, NLLs and target-probability change.

    ``base_logits`` and ``test_logits`` are ``[n_tokens, n_vocab]`` logits for the
    positions whose next token is ``targets[i]``. ``threads`` computes that many contiguous
    spans of rows at once (numpy releases the GIL in its loops); every row is computed alone,
    so the bits do not depend on ``threads`` or ``block_rows``.
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
    if threads < 1:
        raise ValueError("threads must be >= 1")

    def span(starts: Sequence[int]) -> list[TokenStats]:
        ws = _Workspace(min(block_rows, n), n_vocab)
        return [_block_stats(base_logits[s:s + block_rows], test_logits[s:s + block_rows],
                             targets[s:s + block_rows], s, ws) for s in starts]

    starts = list(range(0, n, block_rows))
    spans = [starts[len(starts) * i // threads:len(starts) * (i + 1) // threads] for i in range(threads)]
    spans = [s for s in spans if s]
    if len(spans) <= 1:
        return TokenStats.concat(span(starts))
    with ThreadPoolExecutor(len(spans)) as pool:
        return TokenStats.concat([part for parts in pool.map(span, spans) for part in parts])


def summarize(stats: TokenStats) -> TokenSummary:
    """Aggregate statistics in the style of ``llama-perplexity --kl-divergence``."""
    n = len(stats)
    if n == 0:
        raise ValueError("cannot summarize zero tokens")
    p999, p99, p95, p90, p50 = np.percentile(stats.kld, [99.9, 99, 95, 90, 50], method="linear")
    ln_ratio = float(np.mean(stats.nll_test - stats.nll_base))
    return TokenSummary(
        n_tokens=n,
        kld_mean=float(np.mean(stats.kld)),
        kld_max=float(np.max(stats.kld)),
        kld_p99_9=float(p999),
        kld_p99=float(p99),
        kld_p95=float(p95),
        kld_p90=float(p90),
        kld_median=float(p50),
        top1_agreement=float(np.mean(stats.top1)),
        ppl_base=math.exp(float(np.mean(stats.nll_base))),
        ppl_test=math.exp(float(np.mean(stats.nll_test))),
        ln_ppl_ratio=ln_ratio,
        ppl_ratio=math.exp(ln_ratio),
        dp_mean=float(np.mean(stats.dp)),
        dp_rms=math.sqrt(float(np.mean(np.square(stats.dp)))),
    )


@dataclass(frozen=True)
class Metric:
    """A token metric with an interval: where its estimate and interval sit in a TokenSummary, the
    per-token series its interval is drawn from, and how the report shows it."""

    estimate: str                # TokenSummary field shown as the estimate
    interval: str                # TokenSummary field of the interval (results.json), and its block's name
    block: str
    per_token: Callable[[Mapping[str, np.ndarray]], np.ndarray]  # from a group's per-token arrays
    header: str                  # the report's column header
    title: str                   # the report's plot panel
    spec: str = ".3g"            # display format
    percent: bool = False
    log_interval: bool = False   # the interval is of the log: the report shows exp of its bounds


# the metrics summarize's intervals are computed for (harness.verdicts.with_intervals, in this order:
# each one's bootstrap seed is its index) and the report's matrix table shows
METRICS = (
    Metric("kld_mean", "kld_ci", "kld", lambda a: a["kld"], "KLD mean [95 % CI]", "mean KLD vs baseline"),
    Metric("top1_agreement", "top1_ci", "top1", lambda a: a["top1"].astype(np.float64), "top-1 agreement [95 % CI]",
           "top-1 agreement with baseline", ".4g", percent=True),
    Metric("ppl_ratio", "ln_ppl_ratio_ci", "ln_ppl_ratio", lambda a: a["nll_test"] - a["nll_base"],
           "PPL ratio [95 % CI]", "perplexity ratio test / baseline", ".4f",
           log_interval=True),  # ratios sit close to 1: four decimals show the change
)


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
