"""One thin module per DVC stage: read params, call the library, write the stage's outputs.

All output paths are relative to the working directory, which DVC sets to the repo root (or to
the temporary copy under `dvc exp run --temp/--queue`); only the MLflow store lives at DVC_ROOT.
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


# The encoder that goes downstream: the selected cell after `pretrain_full`.
ENCODER = MODELS / "encoder.pt"


def mae_path(cell: str) -> Path:
    return MODELS / "mae" / f"{cell}.pt"


def arm_path(arm: str, k: int) -> Path:
    """Checkpoint of downstream arm `arm` (probe, finetune, scratch, probe_random), repetition k."""
    return MODELS / arm / f"s{k}.pt"


def adapted_encoder(ckpt: dict, d: dict):
    """The encoder of MAE checkpoint `ckpt` adapted to the downstream images `d` (channels, size,
    normalisation); None when its patch does not divide their size."""
    from .. import checkpoint
    from ..adapt import adapt_encoder

    encoder = checkpoint.encoder_from(ckpt)
    size = d["x_train"].shape[-1]
    if size % encoder.cfg.patch:
        return None
    return adapt_encoder(encoder, d["x_train"].shape[1], size, d["mean"], d["std"])


def downstream_encoder(d: dict):
    """The encoder that goes downstream (`models/encoder.pt`), adapted to the downstream images.
    Returns (encoder, cell it was selected as)."""
    from .. import checkpoint
    from ..params import require_patch_divides

    ckpt = checkpoint.load(ENCODER)
    encoder = adapted_encoder(ckpt, d)
    if encoder is None:
        require_patch_divides(d["x_train"].shape[-1], ckpt["vit"]["patch"], "downstream.image_size")
    return encoder, ckpt["meta"]["cell"]
