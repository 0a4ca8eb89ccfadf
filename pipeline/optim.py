"""Optimizers (AdamW, LARS, SGD), their parameter groups (weight decay, layer-wise lr decay), the
learning-rate scaling rule and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .errors import UserError

LR_REFERENCE_BATCH = 256


def scaled_lr(lr: float, batch_size: int) -> float:
    """Every lr in params.yaml is per 256 images: the optimiser steps at lr * batch / 256.

    The linear scaling rule (Goyal et al. 2017; MAE's `blr`): an update averages over `batch`
    images, so k times the batch takes k times fewer steps of k times the size and follows about
    the same trajectory. Warm-up is counted in epochs, so it lengthens in steps by itself."""
    return lr * batch_size / LR_REFERENCE_BATCH


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as the MAE linear probe uses.

    Weight decay and the trust ratio apply to matrices only; 1-D parameters (biases) take the plain
    momentum step at the full rate, as facebookresearch/mae's LARS does. (An earlier version
    stepped them at lr * 0.001, which froze the biases of the probe's head.)"""

    def __init__(
        self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(
                        p_norm > 0, torch.where(u_norm > 0, group["trust_coefficient"] * p_norm / u_norm, one), one
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, biases/norms/tokens do not."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def layer_decay_groups(encoder: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay for fine-tuning (BEiT, MAE): block i (0-based) of D steps at
    lr * layer_decay ** (D - i), the patch embedding and CLS token at lr * layer_decay ** (D + 1),
    the final norm at lr. Low layers hold the most general pretrained features and move least.
    `layer_decay: 1` is one lr for the whole encoder."""
    depth = len(encoder.blocks)

    def layer(name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1 if name.startswith("norm.") else 0

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith("token"))
        layer_id = layer(name)
        group = groups.setdefault(
            (layer_id, decay),
            {
                "params": [],
                "lr": lr * layer_decay ** (depth + 1 - layer_id),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(name: str, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    lr = groups[0]["lr"]
    if name == "adamw":
        kwargs = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kwargs)
    if name == "lars":
        return LARS(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise UserError(f"params: optimizer = {name!r}: must be one of adamw, lars, sgd")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up to each group's lr, then cosine to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
