"""The encoders that go downstream, per repetition: the selected cell's pretrained encoder
(`pretrain_full@k`) adapted to the downstream images, or, for the controls, a fresh random encoder
of exactly that architecture (which needs the selected patch size, not the pretrained weights nor
the mask ratio)."""

from __future__ import annotations

from .. import checkpoint
from ..adapt import adapt_encoder, adapted_config
from ..model import Encoder, ViTConfig
from ..params import Params, require_patch_divides
from . import architecture_path, encoder_path
from .vit import vit_config


def adapted(ckpt: dict, d: dict) -> Encoder | None:
    """The encoder of MAE checkpoint `ckpt` adapted to the downstream images `d` (channels, size,
    normalisation); None when its patch does not divide their size."""
    encoder = checkpoint.encoder_from(ckpt)
    size = d["x_train"].shape[-1]
    if size % encoder.cfg.patch:
        return None
    return adapt_encoder(encoder, d["x_train"].shape[1], size, d["mean"], d["std"])


def pretrained(d: dict, k: int) -> tuple[Encoder, str]:
    """Repetition k's pretrained encoder, adapted to the downstream images; and its cell."""
    ckpt = checkpoint.load(encoder_path(k))
    encoder = adapted(ckpt, d)
    if encoder is None:
        require_patch_divides(d["x_train"].shape[-1], ckpt["vit"]["patch"], "downstream.image_size")
    return encoder, ckpt["meta"]["cell"]


def control_config(p: Params, d: dict, k: int) -> tuple[ViTConfig, str]:
    """The architecture of repetition k's encoder once adapted to the downstream images `d`, from
    its selected patch size and the params alone; and its name (`p<patch>`)."""
    import json

    from ..errors import UserError

    path = architecture_path(k)
    try:
        patch = json.loads(path.read_text())["patch"]
    except OSError:
        raise UserError(f"select: {path} is missing; run `dvc repro select`") from None
    size = d["x_train"].shape[-1]
    require_patch_divides(size, patch, "downstream.image_size")
    # The pretraining images' size and the downstream images' channels and statistics: the
    # adaptation replaces channels and statistics, so the pretraining data need not be read.
    pretrain_cfg = vit_config(p, patch, d)
    return adapted_config(pretrain_cfg, d["x_train"].shape[1], size, d["mean"], d["std"]), f"p{patch}"


def for_arm(p: Params, init: str):
    """`encoder_of(d, k)` for an arm: (pretrained encoder, its config, cell, its file) for `init:
    pretrained`; (None, the control's config, its patch, the architecture file) for `init:
    random`, which reads no pretrained weights."""

    def pretrained_of(d: dict, k: int):
        encoder, cell = pretrained(d, k)
        return encoder, encoder.cfg, cell, encoder_path(k)

    def control_of(d: dict, k: int):
        cfg, cell = control_config(p, d, k)
        return None, cfg, cell, architecture_path(k)

    return pretrained_of if init == "pretrained" else control_of
