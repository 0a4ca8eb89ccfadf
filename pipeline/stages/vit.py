"""The one place params become a ViT: `model.*` at a patch size, for prepared images."""

from ..model import ViTConfig
from ..params import Params


def vit_config(p: Params, patch: int, d: dict) -> ViTConfig:
    """The one place params become a ViT: `model.*` at `patch`, for the prepared images `d`
    (their size, channels and normalisation)."""
    m = p.model
    return ViTConfig(
        p.data.image_size,
        d["x_train"].shape[1],
        patch,
        m.dim,
        m.depth,
        m.heads,
        m.mlp_ratio,
        tuple(float(x) for x in d["mean"]),
        tuple(float(x) for x in d["std"]),
    )
