"""ViT encoder, Masked Autoencoder and classifier. Pure PyTorch: no files, no params, no MLflow."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .choices import HEADS, LOSSES, POOLS, num_visible


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    channels: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    # Per-channel input normalisation, fixed from the training split so a checkpoint is
    # self-contained.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    # The patch grid the positions were learned on (0: this one). A transferred encoder keeps the
    # old positions' meaning: see `sincos_pos_embed_2d`.
    pos_grid: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def sincos_pos_embed_2d(dim: int, grid: int, source_grid: int = 0) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions, [grid*grid, dim]: half the channels encode x, half y.

    With `source_grid`, the positions of a `source_grid` x `source_grid` table resampled to
    `grid` x `grid` patches covering the same image: each new patch centre is mapped into the old
    grid's coordinates and the sin-cos function is evaluated there. That is what interpolating the
    table would approximate, computed exactly; `source_grid == grid` gives the table itself."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    if source_grid and source_grid != grid:
        coords = (coords + 0.5) * (source_grid / grid) - 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ax = xs.reshape(-1, 1) * omega
    ay = ys.reshape(-1, 1) * omega
    return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, patch*patch*C], patches in row-major order, pixels (p, q, c)."""
    b, c, h, w = images.shape
    g = h // patch
    x = images.reshape(b, c, g, patch, g, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch, g * patch)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch for whole samples, scaling the
    kept ones by 1 / (1 - rate) so the expectation is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = 0.0  # a fine-tuning regulariser, set by Encoder.set_drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Encoder(nn.Module):
    """ViT with a CLS token and fixed 2-D sin-cos positions; can run on a subset of patches."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch * cfg.patch * cfg.channels, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.dim, cfg.grid, cfg.pos_grid)[None], persistent=False)
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 (first block) to `rate` (last), as in MAE's
        fine-tuning: deep blocks are the most specialised to pretraining and the cheapest to drop."""
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path = rate * i / (depth - 1) if depth > 1 else rate

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> patch tokens with positions, [B, L, dim] (no CLS yet)."""
        x = (images - self.mean) / self.std
        return self.patch_embed(patchify(x, self.cfg.patch)) + self.pos_embed

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Returns [B, 1 + L_kept, dim]; `keep` ([B, L_kept] patch indices) drops the rest."""
        x = self.tokens(images)
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffle: returns (keep indices [B, K], restore order [B, L], mask [B, L] 1=hidden)."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    k = num_visible(num_patches, mask_ratio)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :k] = 0
    return shuffle[:, :k], restore, torch.gather(mask, 1, restore)


class MAE(nn.Module):
    """Masked Autoencoder: encoder on visible patches, light decoder on all positions."""

    def __init__(
        self,
        cfg: ViTConfig,
        mask_ratio: float,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        loss: str = "mse",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.cfg, self.mask_ratio, self.loss_kind = cfg, mask_ratio, loss
        self.encoder = Encoder(cfg)
        self.decoder_embed = nn.Linear(cfg.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_pos_embed_2d(decoder_dim, cfg.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, cfg.mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, cfg.patch * cfg.patch * cfg.channels)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        b, n = restore.shape
        filler = self.mask_token.expand(b, n - visible.shape[1], -1)
        x = torch.cat([visible, filler], dim=1)
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + self.decoder_pos
        x = torch.cat([cls, x], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Images in [0, 1]. Returns loss (masked patches only), raw prediction and mask."""
        keep, restore, mask = random_masking(
            images.shape[0], self.cfg.num_patches, self.mask_ratio, images.device, generator
        )
        pred = self.decode(self.encoder(images, keep), restore)
        target = patchify(images, self.cfg.patch)
        return {"loss": self.loss(pred, target, mask), "pred": pred, "mask": mask, "target": target}

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pred = pred.float()
        if self.loss_kind == "bce":
            per_patch = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(-1)
        else:
            if self.loss_kind == "norm_pix":
                target = _normalise_patches(target)
            per_patch = (pred - target).pow(2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def to_pixels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Prediction -> patch pixels in [0, 1], whatever the loss was trained on."""
        pred = pred.float()
        if self.loss_kind == "bce":
            return pred.sigmoid()
        if self.loss_kind == "norm_pix":
            # norm_pix predicts each patch up to its own mean/std; undo with the target's, as the
            # MAE paper does for its figures.
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            return (pred * (var + 1e-6).sqrt() + mean).clamp(0, 1)
        return pred.clamp(0, 1)


def _normalise_patches(target: torch.Tensor) -> torch.Tensor:
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6).sqrt()


def masked_pixel_sse(
    pixels: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared pixel errors over hidden patches and the number of such pixels.

    Summed, not averaged, so callers can pool batches exactly; the ratio is a per-pixel MSE that
    means the same for every patch size and mask ratio."""
    sse = ((pixels - target).pow(2).sum(-1) * mask).sum()
    return sse, mask.sum() * target.shape[-1]


def pooled_features(encoder: Encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per image: the CLS token or the mean of the patch tokens."""
    tokens = encoder(images)
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


class Classifier(nn.Module):
    """Encoder + pooled feature + head. `linear` has a non-affine BatchNorm before it (MAE paper)."""

    def __init__(
        self, encoder: Encoder, num_classes: int, head: str = "linear", pool: str = "cls", mlp_hidden: int = 512
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.encoder, self.pool = encoder, pool
        dim = encoder.cfg.dim
        if head == "linear":
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
        else:
            self.head = nn.Sequential(
                nn.BatchNorm1d(dim, affine=False),
                nn.Linear(dim, mlp_hidden),
                nn.GELU(),
                nn.Linear(mlp_hidden, num_classes),
            )
        self.head.apply(_init_weights)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, images, self.pool)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
