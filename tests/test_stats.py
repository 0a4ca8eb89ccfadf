"""pipeline.stats against hand computations, exact bootstrap enumerations and simulated coverage."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from pipeline import stats
from pipeline.stats import mcnemar, mean_sd, paired_bootstrap


def make_arms(d) -> tuple[np.ndarray, np.ndarray]:
    """a = 1, b = 0 where d = +1; a = 0, b = 1 where d = -1; both right where d = 0."""
    d = np.asarray(d)
    return (d >= 0), (d <= 0)


def exact_image_bootstrap(d: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """All N**N equiprobable image resamples of a 1-D difference vector: sorted values, CDF."""
    n = len(d)
    vals = [sum(d[i] for i in t) / n for t in itertools.product(range(n), repeat=n)]
    counts = Counter(vals)
    support = np.array(sorted(counts))
    cdf = np.cumsum([counts[v] for v in support]) / n**n
    return support, cdf


def inverse_cdf(support, cdf, q):
    return support[np.searchsorted(cdf, q)]


# --- paired_bootstrap ----------------------------------------------------------------------------


def test_make_arms_helper():
    a, b = make_arms([1, 0, -1])
    assert (a.astype(int) - b.astype(int)).tolist() == [1, 0, -1]


def test_observed_diff_is_hand_mean():
    # seed 0: a-b = [1, 0, 0, -1, 1] -> 1/5; seed 1: [1, 1, 0, 0, 0] -> 2/5; mean over both = 3/10
    d = np.array([[1, 0, 0, -1, 1], [1, 1, 0, 0, 0]])
    a, b = make_arms(d)
    r = paired_bootstrap(a, b, n_boot=200)
    assert r["diff"] == pytest.approx(0.3, abs=1e-15)
    assert (r["n_seeds"], r["n_images"], r["n_boot"]) == (2, 5, 200)
    assert r["ci_low"] <= r["diff"] <= r["ci_high"]


def test_k_of_n_plus_one_is_exactly_k_over_n():
    n, k = 7, 3
    a = np.ones(n, dtype=bool)
    b = np.arange(n) >= k  # b wrong on the first k images only
    assert paired_bootstrap(a, b, n_boot=50)["diff"] == k / n


def test_identical_arms_collapse_to_zero():
    rng = np.random.default_rng(3)
    a = rng.random((3, 50)) < 0.7
    r = paired_bootstrap(a, a.copy(), n_boot=500)
    assert (r["diff"], r["ci_low"], r["ci_high"]) == (0.0, 0.0, 0.0)


def test_a_always_right_b_always_wrong_collapse_to_one():
    a = np.ones((3, 40), dtype=int)
    b = np.zeros((3, 40), dtype=int)
    r = paired_bootstrap(a, b, n_boot=500)
    assert (r["diff"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0)
    r = paired_bootstrap(b, a, n_boot=500)
    assert (r["diff"], r["ci_low"], r["ci_high"]) == (-1.0, -1.0, -1.0)


@pytest.mark.parametrize(
    "d, expected",
    [
        # Hand-enumerated over all 4**4 resamples: P(mean <= -0.75) = 9/256 > 0.025 > P(mean = -1) = 1/256,
        # and symmetrically on the upper side, so the exact 95 % percentile interval is [-0.75, 0.75].
        ([1, 0, 0, -1], (-0.75, 0.75)),
        # P(<= -0.75) = 5/256 < 0.025 < P(<= -0.5) = 19/256; P(<= 0.75) = 240/256 < 0.975.
        ([1, 1, 0, -1], (-0.5, 1.0)),
    ],
)
def test_percentile_ci_matches_exact_enumeration(d, expected):
    support, cdf = exact_image_bootstrap(d)
    exact = (inverse_cdf(support, cdf, 0.025), inverse_cdf(support, cdf, 0.975))
    assert exact == expected
    # Neither percentile sits near a jump of the exact CDF, so sampling noise cannot move it.
    assert np.min(np.abs(cdf - 0.025)) > 0.005 and np.min(np.abs(cdf - 0.975)) > 0.005
    a, b = make_arms(d)
    r = paired_bootstrap(a, b, n_boot=20000, seed=1)
    assert (r["ci_low"], r["ci_high"]) == expected
    assert r["diff"] == sum(d) / len(d)


def test_two_level_replicate_distribution_matches_enumeration():
    # S=2, N=2: all 2**2 seed draws x 2**2 shared image draws are equiprobable. With these rows the
    # shared image draw matters: drawing image indices independently per seed would give a different law.
    d = np.array([[1, -1], [-1, 0]], dtype=np.int8)
    exact = Counter()
    for seeds in itertools.product(range(2), repeat=2):
        for imgs in itertools.product(range(2), repeat=2):
            exact[np.mean([np.mean(d[s, list(imgs)]) for s in seeds])] += 1 / 16
    independent = Counter()
    for seeds in itertools.product(range(2), repeat=2):
        for imgs in itertools.product(range(2), repeat=4):
            per_seed = [np.mean(d[s, list(imgs[2 * j : 2 * j + 2])]) for j, s in enumerate(seeds)]
            independent[np.mean(per_seed)] += 1 / 64
    assert exact != independent

    n_boot = 40000
    reps = stats._bootstrap_replicates(d, n_boot, np.random.default_rng(0))
    got = Counter(reps.tolist())
    assert set(got) <= set(exact)
    for v, p in exact.items():
        assert got[v] / n_boot == pytest.approx(p, abs=0.01), v


def test_seed_level_widens_the_interval():
    # Seed means 0.0, 0.1, 0.2 from deterministic rows; the image-only bootstrap of the pooled
    # 3N images sees only the small within-test-set noise and misses the run-to-run spread.
    n = 1000
    d = np.zeros((3, n), dtype=int)
    for s in range(3):
        d[s, : 100 * s] = 1
    a, b = make_arms(d)
    two = paired_bootstrap(a, b, n_boot=2000)
    pooled = paired_bootstrap(a.reshape(1, -1), b.reshape(1, -1), n_boot=2000)
    assert two["diff"] == pytest.approx(0.1) and pooled["diff"] == pytest.approx(0.1)
    two_w = two["ci_high"] - two["ci_low"]
    pooled_w = pooled["ci_high"] - pooled["ci_low"]
    assert two_w > 3 * pooled_w
    assert two_w > 0.1  # the seed means alone span 0.2; resampling 3 of them reaches most of it


def test_single_seed_is_the_image_bootstrap_and_1d_is_accepted():
    rng = np.random.default_rng(5)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.7
    r1 = paired_bootstrap(a, b, n_boot=1000, seed=4)
    r2 = paired_bootstrap(a[None], b[None], n_boot=1000, seed=4)
    assert r1 == r2 and r1["n_seeds"] == 1
    # Against a plain image bootstrap: mean of N resampled differences.
    d = a.astype(int) - b.astype(int)
    plain = np.array([d[rng.integers(0, 300, 300)].mean() for _ in range(4000)])
    lo, hi = np.quantile(plain, [0.025, 0.975])
    assert r1["ci_low"] == pytest.approx(lo, abs=0.015)
    assert r1["ci_high"] == pytest.approx(hi, abs=0.015)


def test_deterministic_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(7)
    a = rng.random((3, 400)) < 0.75
    b = rng.random((3, 400)) < 0.7
    r = paired_bootstrap(a, b, n_boot=1500, seed=11)
    assert paired_bootstrap(a, b, n_boot=1500, seed=11) == r
    assert paired_bootstrap(a, b, n_boot=1500, seed=12) != r
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 400 * 37)  # uneven chunks of 37 replicates
    assert paired_bootstrap(a, b, n_boot=1500, seed=11) == r


def test_level_changes_width():
    rng = np.random.default_rng(8)
    a = rng.random((2, 500)) < 0.75
    b = rng.random((2, 500)) < 0.7
    r95 = paired_bootstrap(a, b, n_boot=2000)
    r50 = paired_bootstrap(a, b, n_boot=2000, level=0.5)
    assert r95["ci_low"] < r50["ci_low"] < r50["ci_high"] < r95["ci_high"]


def test_coverage_of_known_true_difference():
    rng = np.random.default_rng(2024)
    p_a, p_b, n, trials = 0.75, 0.65, 200, 200
    covered = 0
    for t in range(trials):
        a = rng.random(n) < p_a
        b = rng.random(n) < p_b
        r = paired_bootstrap(a, b, n_boot=500, seed=t)
        covered += r["ci_low"] <= p_a - p_b <= r["ci_high"]
    assert 0.88 <= covered / trials <= 0.99, covered


def test_the_default_runs_size_brackets_its_difference():
    """3 repetitions x 10,000 test images, 10,000 replicates, as evaluate runs it (its speed is for
    `make bench`, not a test)."""
    rng = np.random.default_rng(0)
    a = rng.random((3, 10000)) < 0.8
    b = rng.random((3, 10000)) < 0.78
    r = paired_bootstrap(a, b, n_boot=10000)
    assert r["ci_low"] < r["diff"] < r["ci_high"] and (r["n_seeds"], r["n_images"]) == (3, 10000)


@pytest.mark.parametrize(
    "a, b",
    [
        (np.ones((2, 5)), np.ones((2, 6))),
        (np.ones((2, 5)), np.ones((3, 5))),
        (np.ones(5), np.ones((2, 5))),
        (np.ones((0, 5)), np.ones((0, 5))),
        (np.ones((2, 0)), np.ones((2, 0))),
        (np.ones((1, 2, 3)), np.ones((1, 2, 3))),
        (np.full((2, 3), 0.5), np.ones((2, 3))),
    ],
)
def test_bad_input_raises(a, b):
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, n_boot=10)


def test_bad_options_raise():
    a = np.ones((1, 3), dtype=bool)
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, n_boot=0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, level=1.0)


# --- mcnemar -------------------------------------------------------------------------------------


def discordant(b: int, c: int, both_right: int = 5, both_wrong: int = 3) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    bb = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return np.array(a, dtype=bool), np.array(bb, dtype=bool)


def test_mcnemar_hand_computation():
    r = mcnemar(*discordant(8, 2))
    hand = 2 * sum(math.comb(10, k) for k in range(3)) / 2**10
    assert hand == 0.109375
    assert (r["b"], r["c"]) == (8, 2)
    assert r["p"] == pytest.approx(hand, rel=1e-12)
    assert mcnemar(*discordant(2, 8))["p"] == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("b, c", [(0, 1), (1, 0), (0, 6), (3, 3), (4, 5), (10, 1), (0, 20), (17, 9), (40, 25)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    r = mcnemar(*discordant(b, c))
    assert (r["b"], r["c"]) == (b, c)
    assert r["p"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_no_discordant_pairs():
    r = mcnemar(*discordant(0, 0))
    assert r == {"b": 0, "c": 0, "p": 1.0}


def test_mcnemar_bad_input():
    with pytest.raises(ValueError):
        mcnemar(np.ones(4), np.ones(5))
    with pytest.raises(ValueError):
        mcnemar(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError):
        mcnemar(np.ones(0), np.ones(0))


# --- mean_sd -------------------------------------------------------------------------------------


def test_mean_sd_hand_example():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; / (4 - 1)
    m, sd = mean_sd([1, 2, 3, 4])
    assert m == 2.5
    assert sd == pytest.approx(math.sqrt(5 / 3), rel=1e-12)


def test_mean_sd_single_value_and_empty():
    assert mean_sd([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])
