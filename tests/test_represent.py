import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.represent import knn_accuracy, ridge_probe_accuracy, spearman

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def clusters(n_per_class=100, classes=3, spread=0.3, seed=0):
    """Gaussian blobs around 2-D means far apart (on a circle, so they also differ in angle)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(classes) * 2 * math.pi / classes
    means = 10 * torch.stack([angles.cos(), angles.sin()], 1)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = means[y] + spread * torch.randn(len(y), 2, generator=g)
    return x, y


def random_problem(n=600, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


# --- k-NN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_knn_separated_clusters_is_perfect(device):
    x, y = clusters(seed=0)
    qx, qy = clusters(seed=1)
    assert knn_accuracy(x.to(device), y.to(device), qx.to(device), qy.to(device), 3) == 1.0


def test_knn_on_label_independent_features_is_near_chance():
    x, _ = random_problem(seed=0)
    qx, _ = random_problem(seed=1)
    y = torch.arange(3).repeat(200)  # balanced, and independent of the random features
    acc = knn_accuracy(x, y, qx, y, 3)
    assert 0.2 < acc < 0.5


def test_knn_is_cosine_so_row_scaling_does_not_matter():
    x, y = random_problem(n=300, seed=0)
    qx, qy = random_problem(n=200, seed=1)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # labels learnable from the features
    qy = (qx[:, 0] > 0).long() + (qx[:, 1] > 0).long()
    g = torch.Generator().manual_seed(2)
    scale = lambda t: t * torch.empty(len(t), 1).uniform_(0.1, 10, generator=g)  # noqa: E731
    base = knn_accuracy(x, y, qx, qy, 3, k=10)
    assert base > 0.6
    assert knn_accuracy(scale(x), y, scale(qx), qy, 3, k=10) == base


def test_knn_k1_on_training_points_is_perfect_and_chunking_does_not_matter():
    x, y = random_problem(n=257, seed=3)
    assert knn_accuracy(x, y, x, y, 3, k=1) == 1.0
    assert knn_accuracy(x, y, x, y, 3, k=1, chunk=10) == 1.0
    assert knn_accuracy(x, y, x, y, 3, chunk=7) == knn_accuracy(x, y, x, y, 3, chunk=1024)


def test_knn_weighted_vote_beats_majority_by_hand():
    # Query (1, 0). Its 3 nearest training points: class 0 at cosine 1, two of class 1 at cosine 0.5;
    # the 4th, class 0 at cosine -1, is outside k=3. Majority says 1. Weights: class 0 gets
    # exp(1/T), class 1 gets 2 exp(0.5/T): class 0 wins iff exp(0.5/T) > 2, i.e. T < 0.5/ln 2 = 0.72.
    h = math.sqrt(3) / 2
    x = torch.tensor([[1.0, 0.0], [0.5, h], [0.5, -h], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    q, qy = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    assert knn_accuracy(x, y, q, qy, 2, k=3, temperature=0.07) == 1.0  # weighted: class 0
    assert knn_accuracy(x, y, q, qy, 2, k=3, temperature=1.0) == 0.0  # near-flat weights: class 1


def test_knn_k_beyond_training_set_uses_all_and_tiny_temperature_does_not_overflow():
    x, y = clusters(n_per_class=2)
    assert knn_accuracy(x, y, x, y, 3, k=100) == 1.0
    assert knn_accuracy(x, y, x, y, 3, k=100, temperature=1e-4) == 1.0


# --- ridge probe -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_ridge_linearly_separable_is_perfect(device):
    x, y = clusters(seed=0)
    qx, qy = clusters(seed=1)
    assert ridge_probe_accuracy(x.to(device), y.to(device), qx.to(device), qy.to(device), 3) == 1.0


def numpy_ridge_predict(x, y, qx, classes, l2):
    x, qx = x.numpy().astype(np.float64), qx.numpy().astype(np.float64)
    mu, sd = x.mean(0), np.maximum(x.std(0), 1e-6)
    design = lambda a: np.hstack([(a - mu) / sd, np.ones((len(a), 1))])  # noqa: E731
    X, Y = design(x), np.eye(classes)[y.numpy()]
    P = np.diag([l2 * len(X)] * (X.shape[1] - 1) + [0.0])
    W = np.linalg.solve(X.T @ X + P, X.T @ Y)
    return (design(qx) @ W).argmax(1), (design(x), design(qx))


def test_ridge_matches_independent_closed_forms():
    x, y = random_problem(n=60, d=10, classes=4, seed=5)
    x = x * torch.linspace(0.5, 5, 10) + 3  # uneven scales, so standardisation matters
    qx, _ = random_problem(n=40, d=10, seed=6)
    l2 = 0.1
    pred, (Xs, Qs) = numpy_ridge_predict(x, y, qx, 4, l2)
    assert len(set(pred.tolist())) > 1  # a non-trivial prediction to agree with
    # Same predictions <=> accuracy 1 against the numpy predictions, 0 against shifted ones.
    assert ridge_probe_accuracy(x, y, qx, torch.from_numpy(pred), 4, l2=l2) == 1.0
    assert ridge_probe_accuracy(x, y, qx, torch.from_numpy((pred + 1) % 4), 4, l2=l2) == 0.0
    # sklearn's RidgeClassifier ({-1, 1} targets, unpenalised intercept, alpha = l2 * n) on the
    # standardised features predicts the same classes: the -1 offset goes into the intercept.
    linear_model = pytest.importorskip("sklearn.linear_model")
    clf = linear_model.RidgeClassifier(alpha=l2 * len(x)).fit(Xs[:, :-1], y.numpy())
    np.testing.assert_array_equal(clf.predict(Qs[:, :-1]), pred)


def test_ridge_is_invariant_to_per_feature_affine_rescaling():
    # float64 features, so the rescaling itself loses nothing to rounding.
    x, _ = random_problem(n=200, d=6, seed=7)
    qx, _ = random_problem(n=150, d=6, seed=8)
    x, qx = x.double(), qx.double()
    label = lambda f: (f[:, 0] + f[:, 1] > 0).long() + (f[:, 2] > 1).long()  # noqa: E731
    y, qy = label(x), label(qx)
    a = torch.tensor([100.0, 0.01, -3.0, 7.0, 0.5, -0.2], dtype=torch.float64)
    b = torch.tensor([5.0, -40.0, 0.0, 1e3, 2.0, -1.0], dtype=torch.float64)
    base = ridge_probe_accuracy(x, y, qx, qy, 3)
    assert base > 0.6  # well above chance, so there are predictions to preserve
    assert ridge_probe_accuracy(x * a + b, y, qx * a + b, qy, 3) == base


def test_ridge_constant_feature_is_harmless():
    x, y = clusters()
    x = torch.cat([x, torch.full((len(x), 1), 4.0)], 1)
    assert ridge_probe_accuracy(x, y, x, y, 3) == 1.0


# --- spearman --------------------------------------------------------------------------------


def test_spearman():
    a = [1, 2, 3, 4, 5]
    assert spearman(a, [10, 20, 30, 40, 1000]) == pytest.approx(1.0)
    assert spearman(a, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=30), rng.integers(0, 5, size=30)  # v has ties
    assert spearman(u, v) == pytest.approx(stats.spearmanr(u, v).statistic)
    assert spearman(torch.from_numpy(u), torch.from_numpy(v)) == pytest.approx(stats.spearmanr(u, v).statistic)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
        assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))
        assert math.isnan(spearman([1], [2]))
        assert math.isnan(spearman([], []))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [knn_accuracy, ridge_probe_accuracy])
def test_classifiers_reject_bad_inputs(fn):
    x, y = random_problem(n=10)
    with pytest.raises(ValueError, match="differ in length"):
        fn(x, y[:-1], x, y, 3)
    with pytest.raises(ValueError, match="differ in length"):
        fn(x, y, x[:5], y, 3)
    with pytest.raises(ValueError, match="empty"):
        fn(x[:0], y[:0], x, y, 3)
    with pytest.raises(ValueError, match="empty"):
        fn(x, y, x[:0], y[:0], 3)
    with pytest.raises(ValueError, match="widths differ"):
        fn(x, y, x[:, :3], y, 3)


def test_spearman_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1, 2, 3], [1, 2])


def test_knn_leave_one_out_never_votes_for_itself():
    # Two far-apart clusters, one mislabelled point in each: with k=3 and itself excluded, each
    # mislabelled point takes its neighbours' class and is wrong; everything else outvotes the one
    # mislabelled neighbour it may have and is right.
    # Seeded, and spread enough that no two points are near-parallel: k-NN here is by cosine, and
    # with float32 rounding two almost identical directions can tie with a point's own.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10, 4, generator=g) * 0.5 + 5, torch.randn(10, 4, generator=g) * 0.5 - 5])
    y = torch.tensor([0] * 10 + [1] * 10)
    y[0], y[10] = 1, 0
    assert knn_accuracy(x, y, x, y, 2, k=3, leave_one_out=True) == pytest.approx(18 / 20)
    assert knn_accuracy(x, y, x, y, 2, k=1) == 1.0  # without it every point finds itself
    assert knn_accuracy(x, y, x, y, 2, k=3, leave_one_out=True, chunk=3) == pytest.approx(18 / 20)
    with pytest.raises(ValueError):
        knn_accuracy(x, y, x.clone(), y, 2, leave_one_out=True)


def test_ridge_cv_holds_out_every_point_once():
    from pipeline.represent import ridge_cv_accuracy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 0] += 4 * (2 * y - 1)  # a wide margin: a least-squares probe separates it too
    # Separable by one feature: every held-out fold is predicted right.
    assert ridge_cv_accuracy(x, y, 2, folds=5) == 1.0
    # Pure noise features and labels: held out, the probe is near chance, though it fits its own
    # training folds much better.
    noise_y = torch.randint(0, 2, (60,), generator=g)
    noise_x = torch.randn(60, 40, generator=g)
    assert ridge_cv_accuracy(noise_x, noise_y, 2, folds=5) < 0.75
    assert ridge_probe_accuracy(noise_x, noise_y, noise_x, noise_y, 2) > 0.9
    # One member in a class: nothing to hold out.
    assert ridge_cv_accuracy(x[:3], torch.tensor([0, 0, 1]), 2) is None
