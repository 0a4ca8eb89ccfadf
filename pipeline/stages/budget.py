"""Stage `budget`: draw every repetition's label subset (`pipeline.repetition`) and write them to
`data/repetitions.json`, which select, the arms, the pixel floor and the champion choice read.

The budget must fit the data: every class of the downstream training split must hold
`downstream.labels_per_class` images. Checked twice. `validate` checks early, from the class counts
the last `data` run wrote, when they were made with the current data params (so the check is
exact), and refuses the run before any stage starts. This stage checks again on the prepared split
itself (a fresh clone, or changed data params). Its output is `persist`ent, so a budget too large
leaves the previous draw in place and no other stage's outputs are removed."""

import json
from pathlib import Path

from .. import prepared, repetition
from ..params import Params, flatten
from . import CLASS_COUNTS, DOWNSTREAM_DATA


def data_key(p: Params) -> dict:
    """Everything the downstream training split depends on."""
    return {
        "seed": p.seed,
        **flatten(p.data, "data."),
        "downstream.dataset": p.downstream_dataset,
        "downstream.image_size": p.downstream_size,
    }


def draw_key(p: Params) -> dict:
    """Everything the repetitions' subsets depend on (recorded in the file, checked by its readers)."""
    return {
        **data_key(p),
        "repetitions": list(p.repetitions),
        "downstream.labels_per_class": p.downstream.labels_per_class,
        "downstream.dev_fraction": p.downstream.dev_fraction,
    }


def check_early(p: Params) -> None:
    """The check from the last `data` run's class counts, if they are this data's; silent otherwise."""
    try:
        counts = json.loads(CLASS_COUNTS.read_text())
    except (OSError, ValueError):
        return
    if counts.get("made_by") != json.loads(json.dumps(data_key(p))) or p.downstream.labels_per_class == "all":
        return
    for name, n in zip(counts["classes"], counts["train_per_class"]):
        if n < p.downstream.labels_per_class:
            raise prepared.budget_too_large(p.downstream.labels_per_class, name, n)


def run(p: Params, out: Path) -> None:
    d = prepared.load_prepared(DOWNSTREAM_DATA)
    reps = repetition.draw(
        d["y_train"], d["classes"], p.downstream.labels_per_class, p.downstream.dev_fraction, p.seed, p.repetitions
    )
    repetition.save(reps, draw_key(p), out)
    r = reps[0]
    print(
        f"downstream.labels_per_class = {p.downstream.labels_per_class}: {len(reps)} repetitions of "
        f"{len(r.budget)} labels ({len(r.train)} to train on, {len(r.dev)} held out as dev)"
    )
