"""Carry a pretrained encoder to another dataset: other channels, other image size. Pure PyTorch.

Channels: the patch embedding is a linear map on patch vectors whose pixels are ordered
(row, column, channel), so one colour's weights are every C-th input column.
- gray -> RGB: every colour gets the gray filter / 3, so a gray image copied into R, G and B
  gives exactly the embedding the gray image had.
- RGB -> gray: the gray filter is the sum over colours, so a gray image gives the embedding
  its three-channel copy had.
Image size: the positions are fixed sin-cos functions of the patch coordinate, so a new patch
grid gets them evaluated at its patch centres in the old grid's coordinates (`pos_grid`).
Input normalisation becomes the new dataset's own mean/std, so the first layer sees inputs
scaled as in pretraining.
"""

from __future__ import annotations

import dataclasses

import torch

from .model import Encoder, ViTConfig


def inflate_patch_weight(weight: torch.Tensor, patch: int, old_channels: int, new_channels: int) -> torch.Tensor:
    """[dim, p*p*C_old] -> [dim, p*p*C_new] for 1 -> C (split evenly) or C -> 1 (sum)."""
    if old_channels == new_channels:
        return weight.clone()
    dim = weight.shape[0]
    w = weight.reshape(dim, patch * patch, old_channels)
    if old_channels == 1:
        w = w.expand(-1, -1, new_channels) / new_channels
    elif new_channels == 1:
        w = w.sum(dim=2, keepdim=True)
    else:
        raise ValueError(
            f"cannot adapt a {old_channels}-channel patch embedding to {new_channels} channels; only 1 <-> C is defined"
        )
    return w.reshape(dim, patch * patch * new_channels).contiguous()


def adapted_config(cfg: ViTConfig, channels: int, image_size: int, mean, std) -> ViTConfig:
    """The architecture an encoder of `cfg` has once adapted to `channels` x `image_size` inputs
    (what the random-weight controls are built as)."""
    if image_size % cfg.patch:
        raise ValueError(f"image size {image_size} is not a multiple of the encoder's patch {cfg.patch}")
    new_cfg = dataclasses.replace(
        cfg,
        image_size=image_size,
        channels=channels,
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
        pos_grid=cfg.pos_grid or cfg.grid,
    )
    if new_cfg.pos_grid == new_cfg.grid:
        new_cfg = dataclasses.replace(new_cfg, pos_grid=0)
    return new_cfg


def adapt_encoder(encoder: Encoder, channels: int, image_size: int, mean, std) -> Encoder:
    """A new Encoder for `channels` x `image_size` inputs with `encoder`'s weights carried over."""
    cfg = encoder.cfg
    new_cfg = adapted_config(cfg, channels, image_size, mean, std)
    state = dict(encoder.state_dict())
    state["patch_embed.weight"] = inflate_patch_weight(state["patch_embed.weight"], cfg.patch, cfg.channels, channels)
    new = Encoder(new_cfg).to(device=encoder.cls_token.device, dtype=encoder.cls_token.dtype)
    new.load_state_dict(state)
    return new
