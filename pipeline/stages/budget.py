"""The label budget must fit the data: every class of the downstream training split must hold
`downstream.labels_per_class` images.

Checked twice. `validate` checks early, from the class counts the last `data` run wrote, when they
were made with the current data params (so the check is exact), and refuses the run before any
stage starts. The `budget` stage checks again after `data` on the prepared split itself (a fresh
clone, or changed data params), writing only a constant marker that `select`, the arms and
`evaluate` depend on, so a budget too large never removes their outputs."""

import json
from pathlib import Path

from .. import data
from ..fsutil import write_bytes
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
            raise data.budget_too_large(p.downstream.labels_per_class, name, n)


def run(p: Params, marker: Path) -> None:
    d = data.load_prepared(DOWNSTREAM_DATA)
    chosen = data.label_budget(d["y_train"], p.downstream.labels_per_class, p.seed, d["classes"])
    write_bytes(marker, b"the label budget fits the downstream training split\n")
    print(f"downstream.labels_per_class = {p.downstream.labels_per_class}: {len(chosen)} labels per seed")
