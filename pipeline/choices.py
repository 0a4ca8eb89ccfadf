"""The names params may take for model and augmentation options, and the masking rule, in plain
Python: `params` validates with them without importing torch, and `model` / `augment` use the same
definitions."""

LOSSES = ("mse", "norm_pix", "bce")
HEADS = ("linear", "mlp")
POOLS = ("cls", "mean")
AUGMENTS = ("shift", "crop", "flip")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: hide floor(L * ratio), so any ratio < 1 leaves one visible.

    With few patches the effective ratio is quantised (4 patches: 0.5 and 0.7 both hide 2)."""
    return num_patches - int(num_patches * mask_ratio + 1e-9)
