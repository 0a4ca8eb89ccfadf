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


def mae_path(cell: str) -> Path:
    return MODELS / "mae" / f"{cell}.pt"


def downstream_encoder(d: dict, init: str):
    """The selected encoder adapted to the downstream images (channels, size, normalisation),
    with its pretrained weights (`init: pretrained`) or freshly initialised (`init: random`: the
    same architecture, the control arm). Returns (encoder, cell of the selected checkpoint)."""
    from .. import checkpoint
    from ..adapt import adapt_encoder
    from ..errors import UserError
    from ..model import Encoder

    best = checkpoint.load(MODELS / "best.pt")
    encoder = checkpoint.encoder_from(best)
    size, patch = d["x_train"].shape[-1], encoder.cfg.patch
    if size % patch:
        raise UserError(f"params: downstream.image_size = {size}: the selected encoder {best['meta']['cell']} has "
                        f"patch {patch}, which must divide it (sizes allowed: multiples of {patch})")
    encoder = adapt_encoder(encoder, d["x_train"].shape[1], size, d["mean"], d["std"])
    if init == "random":
        encoder = Encoder(encoder.cfg)
    return encoder, best["meta"]["cell"]
