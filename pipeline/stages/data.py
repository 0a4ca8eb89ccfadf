"""Stage `data`: obtain the pretraining and downstream datasets, verify them, write fixed splits."""

from pathlib import Path

import numpy as np

from .. import data, folder, prepared, report, tracking
from ..fsutil import write_bytes
from ..params import Params, flatten
from . import CLASS_COUNTS, DOWNSTREAM_DATA, PRETRAIN_DATA, budget


def _prepare(p: Params, dataset: str, size: int, mode: str) -> dict:
    return data.prepare(
        dataset,
        size,
        p.data.val_fraction,
        p.seed,
        Path(p.data.raw_dir),
        p.data.verify_checksums,
        p.data.train_limit,
        p.data.test_limit,
        mode=mode,
        min_side=max(p.grid.patch),
    )


def run(p: Params) -> None:
    params = {"seed": p.seed, **flatten(p.data, "data."), **flatten(p.downstream, "downstream.")}
    with tracking.start(p.mlflow.experiment, "data", params, p.data.dataset) as run:
        # Both are prepared before either is written: a bad downstream source leaves no half output.
        arrays = {"pretrain": _prepare(p, p.data.dataset, p.data.image_size, p.data.mode)}
        same = (p.downstream_dataset, p.downstream_size, p.downstream_mode) == (
            p.data.dataset,
            p.data.image_size,
            p.data.mode,
        )
        if not same:
            arrays["downstream"] = _prepare(p, p.downstream_dataset, p.downstream_size, p.downstream_mode)
        if not len(arrays.get("downstream", arrays["pretrain"])["classes"]):
            raise folder.unlabelled_downstream(p.downstream.dataset, p.data.dataset)
        prepared.save_prepared(arrays["pretrain"], PRETRAIN_DATA)
        if same:
            write_bytes(DOWNSTREAM_DATA, PRETRAIN_DATA.read_bytes())
        else:
            prepared.save_prepared(arrays["downstream"], DOWNSTREAM_DATA)
        run.log_dataset(PRETRAIN_DATA, f"{p.data.dataset}-pretrain", "prepared")
        run.log_dataset(DOWNSTREAM_DATA, f"{p.downstream_dataset}-downstream", "prepared")
        down = arrays.get("downstream", arrays["pretrain"])
        counts = np.bincount(down["y_train"], minlength=len(down["classes"]))
        report.write_json(
            {
                "made_by": budget.data_key(p),
                "classes": [str(c) for c in down["classes"]],
                "train_per_class": counts.tolist(),
                "channels": {name: int(a["x_train"].shape[1]) for name, a in arrays.items()},
            },
            CLASS_COUNTS,
        )
        for name, a in arrays.items():
            run.log_metrics({f"{name}_n_{split}": len(a[f"y_{split}"]) for split in ("train", "val", "test")})
