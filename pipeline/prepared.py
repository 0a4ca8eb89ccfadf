"""The prepared files every stage after `data` reads (uint8 NCHW images, labels, fixed splits, class
names, the training split's mean and std), and the label budget drawn from them. Apart from
`pipeline.data`, which makes them from the sources, so a stage that only reads them does not
depend on how they are made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .fsutil import atomic_path

PREPARED_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test", "classes", "mean", "std")


def save_prepared(arrays: dict[str, np.ndarray], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_prepared(path: Path) -> dict[str, np.ndarray]:
    hint = "run `dvc repro data` to rebuild it"
    if not path.is_file():
        raise UserError(f"data: prepared file {path} is missing; {hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in PREPARED_KEYS}
    except Exception as e:  # noqa: BLE001 - zip, pickle and key errors all mean "corrupt"
        raise UserError(f"data: prepared file {path} is corrupt ({type(e).__name__}: {e}); {hint}") from None
    return arrays


def budget_too_large(per_class: int, name: str, available: int) -> UserError:
    return UserError(
        f"params: downstream.labels_per_class = {per_class}: class {str(name)!r} has only "
        f"{available} training images; use at most {available} or all"
    )


def label_budget(labels: np.ndarray, per_class, seed: int, classes) -> np.ndarray:
    """Indices of a class-balanced labelled subset: `per_class` images of every class, drawn with
    `seed` (`all`: every index). These are the only labels the downstream stages may use, for
    training and for every choice, as a user with that many labels would have (Oliver et al. 2018).
    Sorted, so the subset is a set and its order carries nothing."""
    if per_class == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise budget_too_large(per_class, name, len(members))
        picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))
