"""Paired comparisons of two arms' per-image correctness: a two-level bootstrap CI, McNemar, mean/sd.

Pure numpy; scipy is imported only inside the functions that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import math

import numpy as np

# Elements of the [chunk, N] index matrix drawn at once: bounds memory (int32 indices + int8 gathers,
# ~25 MB) whatever N is, while keeping chunks large enough for numpy to amortise per-call overhead.
_CHUNK_ELEMENTS = 5_000_000


def _as_correct(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        # A single run is the S=1 case; accepting it saves callers a reshape.
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [S, N] (or [N]); got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: {arr.shape}")
    if arr.dtype != bool:
        # Probabilities or logits passed by mistake would silently give a meaningless "accuracy".
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must be boolean or 0/1")
    return arr.astype(np.int8)


def _paired_differences(correct_a, correct_b) -> np.ndarray:
    a = _as_correct(correct_a, "correct_a")
    b = _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: correct_a {a.shape} vs correct_b {b.shape}")
    return a - b  # int8 in {-1, 0, 1}


def _bootstrap_replicates(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution of mean(d) for d [S, N], resampling seeds and (shared) images."""
    s, n = d.shape
    # Separate streams for the two levels, so a replicate's draws do not depend on the chunk size.
    img_rng, seed_rng = rng.spawn(2)
    idx_dtype = np.int32 if n < 2**31 else np.int64
    chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // n))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        # The same image indices for every seed keep the per-image pairing across runs intact.
        img = img_rng.integers(0, n, size=(m, n), dtype=idx_dtype)
        # Integer sums keep every replicate exact until the single final division.
        sums = np.stack([d[k][img].sum(axis=1, dtype=np.int64) for k in range(s)], axis=1)  # [m, S]
        seeds = seed_rng.integers(0, s, size=(m, s))
        picked = np.take_along_axis(sums, seeds, axis=1).sum(axis=1)
        out[start : start + m] = picked / (s * n)
    return out


def paired_bootstrap(correct_a, correct_b, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Difference of mean accuracies (a - b) with a two-level paired percentile bootstrap CI.

    correct_a, correct_b: boolean/0-1 arrays [S, N]; row s of each arm is a paired run (same label
    subset, head init and batch order) on the same N test images in the same order. A 1-D input is
    taken as S=1. Each replicate draws S seeds and N images with replacement, the image draw shared
    by all seeds, so both run-to-run and test-set variability enter the interval.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    d = _paired_differences(correct_a, correct_b)
    s, n = d.shape
    reps = _bootstrap_replicates(d, n_boot, np.random.default_rng(seed))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return {
        "diff": float(d.sum(dtype=np.int64) / d.size),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_seeds": int(s),
        "n_images": int(n),
        "n_boot": int(n_boot),
    }


def mcnemar(correct_a, correct_b) -> dict:
    """Exact two-sided McNemar test for one pair of runs (1-D arrays over the same N images).

    b counts images only a gets right, c those only b gets right; the concordant ones carry no
    information about which arm is better, so only the b + c discordant images enter the test.
    """
    a = np.asarray(correct_a)
    bb = np.asarray(correct_b)
    if a.ndim != 1 or bb.ndim != 1:
        raise ValueError(f"mcnemar takes 1-D arrays (one run each); got {a.shape} and {bb.shape}")
    if a.shape != bb.shape:
        raise ValueError(f"shape mismatch: correct_a {a.shape} vs correct_b {bb.shape}")
    if a.size == 0:
        raise ValueError("empty input")
    a = _as_correct(a, "correct_a")[0].astype(bool)
    bb = _as_correct(bb, "correct_b")[0].astype(bool)
    b = int(np.count_nonzero(a & ~bb))
    c = int(np.count_nonzero(~a & bb))
    if b + c == 0:
        return {"b": 0, "c": 0, "p": 1.0}
    from scipy.stats import binomtest

    # Under the null each discordant image is a fair coin: the exact two-sided binomial test.
    return {"b": b, "c": c, "p": float(binomtest(b, b + c, 0.5).pvalue)}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of values; sd is 0.0 for a single value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_sd of an empty sequence")
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    if math.isnan(mean):
        raise ValueError("mean_sd got NaN values")
    return mean, sd
