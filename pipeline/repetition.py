"""A repetition: one pretraining run paired with one draw of the label budget.

Repetition k has one seed, `seed + 1000 k`, and everything random in it derives from that seed: the
pretraining run of its encoder (`pretrain_full@k`: initialisation, masks, batch order), its
class-balanced label subset, the split of that subset into the images the arms train on and the
held-out `dev` slice the run's own choices are scored on, and each arm's head initialisation,
batch order and augmentation. Repeating the whole chain, not only the fine-tune, puts the
pretraining run's noise inside every interval `evaluate` reports.

The subsets are drawn once, by the `budget` stage, and written to `data/repetitions.json`; every
later stage reads them from there (`load`) and reads no other training label. Drawing a
class-balanced subset is the one step that looks at every training label: it stands for a user who
labelled that many images of each class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .fsutil import write_bytes

SEED_STRIDE = 1000


def seed_of(base_seed: int, k: int) -> int:
    """Repetition k's seed."""
    return base_seed + SEED_STRIDE * k


@dataclass(frozen=True)
class Repetition:
    k: int
    seed: int
    train: np.ndarray  # indices into the downstream training split: what every arm and floor fits on
    dev: np.ndarray  # the held-out rest of the budget: the run's own choices (the registry champion)

    @property
    def budget(self) -> np.ndarray:
        """Every label this repetition may read (train and dev), sorted."""
        return np.sort(np.concatenate([self.train, self.dev]))


def draw(labels: np.ndarray, classes, per_class, dev_fraction: float, base_seed: int, ks) -> list[Repetition]:
    """The repetitions `ks`: for each, `per_class` labels of every class (all: every image) drawn with
    its seed, of which `dev_fraction` of each class (at least one) is held out as its dev slice."""
    from .prepared import label_budget

    reps = []
    for k in ks:
        seed = seed_of(base_seed, k)
        budget = label_budget(labels, per_class, seed, classes)
        rng = np.random.default_rng([seed, 1])
        train, dev = [], []
        for c, name in enumerate(classes):
            members = budget[labels[budget] == c]
            n_dev = max(1, int(round(dev_fraction * len(members))))
            if len(members) - n_dev < 1:
                raise UserError(
                    f"params: downstream.dev_fraction = {dev_fraction:g}: class {str(name)!r} has "
                    f"{len(members)} budget labels, which leaves none to train on; raise "
                    f"downstream.labels_per_class or lower downstream.dev_fraction"
                )
            shuffled = rng.permutation(members)
            dev.append(shuffled[:n_dev])
            train.append(shuffled[n_dev:])
        reps.append(Repetition(k, seed, np.sort(np.concatenate(train)), np.sort(np.concatenate(dev))))
    return reps


def save(reps: list[Repetition], made_by: dict, path: Path) -> None:
    """JSON (deterministic bytes, so an unchanged draw leaves DVC nothing to re-run)."""
    payload = {
        "made_by": made_by,
        "repetitions": [{"k": r.k, "seed": r.seed, "train": r.train.tolist(), "dev": r.dev.tolist()} for r in reps],
    }
    write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())


def load(path: Path, made_by: dict | None = None) -> list[Repetition]:
    """The repetitions the `budget` stage drew; with `made_by`, refused unless drawn for exactly
    those params (a stale file must not pass for this run's budget)."""
    try:
        payload = json.loads(Path(path).read_text())
    except OSError:
        raise UserError(f"budget: {path} is missing; run `dvc repro budget`") from None
    except ValueError:
        raise UserError(f"budget: {path} is corrupt; run `dvc repro budget`") from None
    if made_by is not None and payload.get("made_by") != json.loads(json.dumps(made_by)):
        raise UserError(f"budget: {path} was drawn for other params; run `dvc repro budget`")
    return [
        Repetition(r["k"], r["seed"], np.asarray(r["train"], dtype=np.int64), np.asarray(r["dev"], dtype=np.int64))
        for r in payload["repetitions"]
    ]
