"""One thin module per DVC stage: read params, call the library, write the stage's outputs.

All output paths are relative to the working directory, which DVC sets to the repo root (or to
the temporary copy under `dvc exp run --temp/--queue`); only the MLflow store lives at DVC_ROOT.
"""
from pathlib import Path

from ..params import Params

MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
IMAGES = PLOTS / "images"
REPORTS = Path("reports")


def prepared_path(p: Params) -> Path:
    return Path("data/prepared") / f"{p.data.dataset}.npz"


def mae_path(cell: str) -> Path:
    return MODELS / "mae" / f"{cell}.pt"
