"""One thin module per DVC stage: read params, call the library, write the stage's outputs.

All output paths are relative to the working directory, which DVC sets to the repo root (or to
the temporary copy under `dvc exp run --temp/--queue`); only the MLflow store lives at DVC_ROOT.
This module holds paths (and the one reader of a selection file): what it imports, every stage
depends on.
"""

from pathlib import Path

MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
IMAGES = PLOTS / "images"
REPORTS = Path("reports")


# Pretraining images, and the labelled images probe / fine-tune / scratch / evaluate use
# (`downstream.*`; a byte copy of the first when it is the same data).
PRETRAIN_DATA = Path("data/prepared/pretrain.npz")
DOWNSTREAM_DATA = Path("data/prepared/downstream.npz")
# Images per class of the downstream training split, and the params that made it: read by
# `validate` to refuse a label budget too large before any stage runs.
CLASS_COUNTS = Path("data/prepared/class_counts.json")
# Every repetition's label subset (train and dev indices), drawn once by `budget`.
REPETITIONS = Path("data/repetitions.json")


def mae_path(cell: str) -> Path:
    return MODELS / "mae" / f"{cell}.pt"


def selection_path(k: int) -> Path:
    """The cell repetition k selected (`select`), the one input of its `pretrain_full@k`."""
    return MODELS / "selection" / f"r{k}.json"


def architecture_path(k: int) -> Path:
    """The patch size repetition k selected: all the random-weight controls need of its cell."""
    return MODELS / "architecture" / f"r{k}.json"


def selected(k: int) -> dict:
    """{cell, patch, mask_ratio}: the cell repetition k selected."""
    import json

    from ..errors import UserError

    path = selection_path(k)
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError(f"select: {path} is missing; run `dvc repro select`") from None


def encoder_path(k: int) -> Path:
    """Repetition k's encoder: its selected cell pretrained by `pretrain_full@k`."""
    return MODELS / "encoder" / f"r{k}.pt"


def arm_path(arm: str, k: int) -> Path:
    """Checkpoint of downstream arm `arm` (probe, finetune, scratch, probe_random), repetition k."""
    return MODELS / arm / f"r{k}.pt"
