"""Checkpoints: a dict of plain values and tensors, written atomically, read with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .fsutil import atomic_path, write_bytes
from .model import MAE, Classifier, Encoder, ViTConfig


def save(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def copy(src: Path, dst: Path) -> dict:
    """Byte-for-byte copy (so DVC sees identical content), after checking that `src` loads."""
    payload = load(src)
    write_bytes(dst, src.read_bytes())
    return payload


def load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint {path} is missing; run `dvc repro` to produce it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, foreign file: all "corrupt"
        raise UserError(
            f"checkpoint {path} is corrupt ({type(e).__name__}); delete it and run `dvc repro` again"
        ) from None


def mae_payload(mae: MAE, **meta) -> dict:
    return {
        "kind": "mae",
        "vit": mae.cfg.to_dict(),
        "mask_ratio": mae.mask_ratio,
        "loss": mae.loss_kind,
        "decoder": meta.pop("decoder"),
        "state_dict": mae.state_dict(),
        "meta": meta,
    }


def build_mae(ckpt: dict) -> MAE:
    mae = MAE(ViTConfig.from_dict(ckpt["vit"]), ckpt["mask_ratio"], loss=ckpt["loss"], **ckpt["decoder"])
    mae.load_state_dict(ckpt["state_dict"])
    return mae


def encoder_from(ckpt: dict) -> Encoder:
    """The pretrained encoder of an MAE checkpoint (the decoder is dropped)."""
    if ckpt.get("kind") != "mae":
        raise UserError(f"expected an MAE checkpoint, got kind {ckpt.get('kind')!r}")
    return build_mae(ckpt).encoder


def classifier_payload(clf: Classifier, head: dict, **meta) -> dict:
    return {
        "kind": "classifier",
        "vit": clf.encoder.cfg.to_dict(),
        "head": head,
        "state_dict": clf.state_dict(),
        "meta": meta,
    }


def build_classifier(ckpt: dict) -> Classifier:
    if ckpt.get("kind") != "classifier":
        raise UserError(f"expected a classifier checkpoint, got kind {ckpt.get('kind')!r}")
    clf = Classifier(Encoder(ViTConfig.from_dict(ckpt["vit"])), **ckpt["head"])
    clf.load_state_dict(ckpt["state_dict"])
    return clf
