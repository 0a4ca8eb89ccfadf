"""Batched on-device image augmentation for MAE pretraining: shift, random-resized crop, flip.

Every op folds into one affine per sample and one grid_sample for the batch, with no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .choices import AUGMENTS

_CROP_AREA = (0.6, 1.0)
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def augment(images: torch.Tensor, ops: tuple[str, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """images: float [B, C, H, W] in [0, 1] (H == W). Returns a new tensor of the same shape/dtype/device."""
    for op in ops:
        if op not in AUGMENTS:
            raise ValueError(f"unknown augment op {op!r}; expected one of {AUGMENTS}")
    if not ops:
        return images

    b, _, h, w = images.shape
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    # Sampling map in normalised coords (output -> input), built as
    #   x_in = sx * f * (x_out - tx) + cx,   y_in = sy * (y_out - ty) + cy
    # i.e. the image is cropped/resized first, then flipped, then shifted.
    # Draw order is fixed (crop, flip, shift) so a seed means the same thing whatever the op order.
    ones = torch.ones(b, device=dev)
    zeros = torch.zeros(b, device=dev)
    sx, sy, cx, cy, f, tx, ty = ones, ones, zeros, zeros, ones, zeros, zeros

    if "crop" in ops:
        area = _CROP_AREA[0] + (_CROP_AREA[1] - _CROP_AREA[0]) * rand(b)
        ratio = torch.exp(_CROP_LOG_RATIO[0] + (_CROP_LOG_RATIO[1] - _CROP_LOG_RATIO[0]) * rand(b))
        # An extreme aspect at large area overflows one side; clamp it so the box stays in the image.
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        pos = 2 * rand(2, b) - 1
        cx, cy = (1 - sx) * pos[0], (1 - sy) * pos[1]

    if "flip" in ops:
        f = torch.where(rand(b) < 0.5, -1.0, 1.0)

    if "shift" in ops:
        # 10% of the side, rounded down: 2 px at 28, 3 px at 32.
        s = max(1, h // 10)
        d = torch.randint(-s, s + 1, (2, b), generator=generator, device=dev).float()
        # Whole pixels are 2/W apart with align_corners=False, so samples land on pixel centres.
        tx, ty = 2 * d[0] / w, 2 * d[1] / h

    theta = torch.stack(
        [
            torch.stack([sx * f, zeros, cx - sx * f * tx], dim=1),
            torch.stack([zeros, sy, cy - sy * ty], dim=1),
        ],
        dim=1,
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Without crop every sample point is a pixel centre (up to rounding), so nearest is exact.
    mode = "bilinear" if "crop" in ops else "nearest"
    out = F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)
