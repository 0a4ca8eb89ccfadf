"""Cheap measures of representation quality on frozen features, to score every MAE grid cell.

Both classifiers train in closed form (no epochs, no hyperparameter search), so scoring a cell costs
one pass over its features and the scores of different cells are comparable. Features are float
[N, D] on any device, labels int64 [N] in [0, num_classes); the work stays on the features' device
and the one host sync is the final `.item()`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _check(train_x, train_y, query_x, query_y, num_classes: int) -> None:
    for name, x, y in (("train", train_x, train_y), ("query", query_x, query_y)):
        if x.ndim != 2 or y.ndim != 1:
            raise ValueError(
                f"{name} features must be [N, D] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if len(x) == 0:
            raise ValueError(f"{name} set is empty")
        if len(x) != len(y):
            raise ValueError(f"{name} features and labels differ in length: {len(x)} vs {len(y)}")
    if train_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"train and query feature widths differ: {train_x.shape[1]} vs {query_x.shape[1]}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    leave_one_out: bool = False,
) -> float:
    """Cosine k-NN: L2-normalise features, for each query take the k most similar training features,
    vote with weights exp(sim / temperature) (as in DINO/InstDisc), predict the class with most weight.
    Returns accuracy on the queries. k larger than len(train_x) uses all training points.

    `leave_one_out`: the queries are the training points themselves and each is classified by the
    others, so a small labelled set scores itself without a held-out split."""
    _check(train_x, train_y, query_x, query_y, num_classes)
    if leave_one_out and (query_x is not train_x or len(train_x) < 2):
        raise ValueError("leave_one_out needs the training features as queries and at least 2 of them")
    if k < 1 or chunk < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1, chunk >= 1 and temperature > 0, got {k}, {chunk}, {temperature}")
    device = train_x.device
    train = F.normalize(train_x.float(), dim=1)
    train_y = train_y.to(device)
    query_y = query_y.to(device)
    k = min(k, len(train) - int(leave_one_out))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(query_x), chunk):
        # Chunking the queries bounds memory at one [chunk, N_train] similarity matrix.
        q = F.normalize(query_x[start : start + chunk].to(device).float(), dim=1)
        sim = q @ train.T
        if leave_one_out:
            rows = torch.arange(len(q), device=device)
            sim[rows, rows + start] = -math.inf
        sim, idx = sim.topk(k, dim=1)
        # Shifting by each row's top similarity scales that row's weights by one common factor (the
        # vote is unchanged) and keeps exp from overflowing float32 at small temperatures.
        weight = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, train_y[idx], weight)
        correct += (votes.argmax(1) == query_y[start : start + chunk]).sum()
    return correct.item() / len(query_x)


def ridge_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    num_classes: int,
    l2: float = 1e-3,
) -> float:
    """Closed-form linear probe: standardise features with the training mean/std (std clamped at 1e-6),
    append a bias column, solve (X^T X + l2 * n * I) W = X^T Y for one-hot targets Y in float64
    (torch.linalg.solve; do not penalise the bias column), predict argmax(X_q W). Returns accuracy.

    The std is the population one (divide by n). Standardising makes the probe invariant to a
    per-feature affine rescaling, so cells whose features differ only in scale score the same."""
    _check(train_x, train_y, query_x, query_y, num_classes)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    device = train_x.device
    x = train_x.double()
    mean = x.mean(0)
    std = x.std(0, correction=0).clamp_min(1e-6)

    def design(feats: torch.Tensor) -> torch.Tensor:
        z = (feats.to(device).double() - mean) / std
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=device)], dim=1)

    X = design(x)
    Y = F.one_hot(train_y.to(device), num_classes).double()
    penalty = torch.full((X.shape[1],), l2 * len(X), dtype=X.dtype, device=device)
    penalty[-1] = 0  # an unpenalised bias lets the probe fit unbalanced class priors
    W = torch.linalg.solve(X.T @ X + torch.diag(penalty), X.T @ Y)
    pred = (design(query_x) @ W).argmax(1)
    return (pred == query_y.to(device)).sum().item() / len(query_x)


def ridge_cv_accuracy(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int = 5, l2: float = 1e-3
) -> float | None:
    """Stratified k-fold accuracy of the closed-form probe on one labelled set: every class is dealt
    round-robin into the folds, each fold is predicted by the probe fitted on the others. Folds are
    capped by the smallest class; None when a class has a single member (nothing to hold out)."""
    y_cpu = y.cpu()
    counts = torch.bincount(y_cpu)
    smallest = int(counts[counts > 0].min())
    folds = min(folds, smallest)
    if folds < 2:
        return None
    fold = torch.empty(len(y_cpu), dtype=torch.int64)
    for c in y_cpu.unique():
        members = torch.nonzero(y_cpu == c).flatten()
        fold[members] = torch.arange(len(members)) % folds
    fold = fold.to(x.device)
    correct = 0.0
    for f in range(folds):
        held = fold == f
        correct += ridge_probe_accuracy(x[~held], y[~held], x[held], y[held], num_classes, l2) * int(held.sum())
    return correct / len(y_cpu)


def pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """`x` [N, D] projected on its top-k principal components (unsupervised: no label is read).

    The raw-pixel floor goes through this so that the closed-form probe fits as many features as
    an encoder gives it: on 784 raw pixels and ~800 labelled rows a least-squares probe would fit
    noise, which measures the probe, not the pixels."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:k].T).float()


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (scipy.stats.spearmanr), ties averaged;
    returns float('nan') if either is constant or has fewer than 2 values (no warning printed)."""
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"spearman needs 1-D sequences, got shapes {a.shape} and {b.shape}")
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal-length sequences, got {len(a)} and {len(b)}")
    # Checked here because scipy would return nan too, but with a ConstantInputWarning.
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    from scipy import stats  # here, not at the top: scipy.stats costs every pretrain stage ~1 s to import

    return float(stats.spearmanr(a, b).statistic)
