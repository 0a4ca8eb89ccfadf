"""Stage `data`: obtain the dataset, verify it, write fixed train/val/test splits."""
from pathlib import Path

from .. import data, tracking
from ..params import Params, flatten
from . import prepared_path


def run(p: Params) -> None:
    with tracking.start(p.mlflow.experiment, "data", {"seed": p.seed, **flatten(p.data, "data.")},
                        p.data.dataset) as run:
        arrays = data.prepare(p.data.dataset, p.data.image_size, p.data.val_fraction, p.seed,
                              Path(p.data.raw_dir), p.data.verify_checksums, p.data.train_limit,
                              p.data.test_limit)
        data.save_prepared(arrays, prepared_path(p))
        run.log_metrics({f"n_{split}": len(arrays[f"y_{split}"]) for split in ("train", "val", "test")})
