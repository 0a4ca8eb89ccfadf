"""Figures (matplotlib, PNG, byte-identical on re-runs). matplotlib is imported at the first figure,
not at import time: stages that draw nothing never load it, and nothing picks a backend as a side
effect of an import."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .fsutil import write_bytes


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, never a window (DVC, CI, a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    plt = pyplot()
    buf = io.BytesIO()
    # No timestamp or version in the PNG, so re-runs give identical files.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _show(ax, image: np.ndarray, title: str | None = None, color: str = "black") -> None:
    """image: [C, H, W] floats in [0, 1]."""
    img = np.clip(np.transpose(image, (1, 2, 0)), 0, 1)
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7, color=color)


def reconstruction_figure(original: np.ndarray, masked: np.ndarray, recon: np.ndarray, title: str, path: Path) -> None:
    plt = pyplot()
    n = len(original)
    fig, axes = plt.subplots(3, n, figsize=(1.1 * n, 3.6), squeeze=False)
    for i in range(n):
        for row, (images, label) in enumerate([(original, "original"), (masked, "masked"), (recon, "reconstruction")]):
            _show(axes[row, i], images[i])
            if i == 0:
                axes[row, i].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def heatmap_figure(
    values: np.ndarray,
    rows: Sequence,
    cols: Sequence,
    chosen: Sequence[tuple[int, int]],
    title: str,
    path: Path,
    higher_is_better: bool = False,
) -> None:
    """values[i, j] for patch rows[i] and mask cols[j]; the chosen cells are boxed. Better is darker."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 1.5, 1.0 * len(rows) + 1.0))
    im = ax.imshow(values, cmap="viridis" if higher_is_better else "viridis_r")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(
                j,
                i,
                f"{values[i, j]:.4f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if (values[i, j] < np.nanmean(values)) == higher_is_better else "black",
            )
    for ci, cj in chosen:
        ax.add_patch(plt.Rectangle((cj - 0.5, ci - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("mask ratio"), ax.set_ylabel("patch size")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def pretrain_curve_figure(curve: Sequence[dict], phases: Sequence[str], title: str, path: Path) -> None:
    """Train and val loss per epoch (left) and val MSE (right); dashed lines where a phase starts."""
    plt = pyplot()
    epochs = [r["epoch"] for r in curve]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(epochs, [r["train_loss"] for r in curve], marker=".", label="train loss (augmented as trained)")
    axes[0].plot(epochs, [r["val_loss"] for r in curve], marker=".", label="val loss (no augmentation)")
    # norm_pix runs have no pixel MSE (None): an empty panel rather than a made-up number.
    axes[1].plot(
        epochs,
        [np.nan if r["val_mse"] is None else r["val_mse"] for r in curve],
        marker=".",
        color="C2",
        label="val MSE, masked pixels",
    )
    starts = [r["epoch"] for prev, r in zip(curve, curve[1:]) if r["phase"] != prev["phase"]]
    for ax in axes:
        for e in starts:
            ax.axvline(e - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("loss")
    fig.suptitle(f"{title}; phases {', '.join(phases)}" if len(phases) > 1 else title, fontsize=9)
    save_figure(fig, path)


def roc_figure(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]], path: Path) -> None:
    """curves[model][label] = (fpr, tpr, auc); one panel per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.6), squeeze=False)
    for ax, (model, per_label) in zip(axes[0], curves.items()):
        for label, (fpr, tpr, auc) in per_label.items():
            style = dict(color="black", linewidth=2.2, linestyle="--") if label == "micro" else dict(linewidth=1)
            ax.plot(fpr, tpr, label=f"{label} ({auc:.3f})", **style)
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6)
        ax.set_title(f"ROC, one-vs-rest: {model}", fontsize=10)
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate")
        ax.legend(fontsize=6, loc="lower right")
    save_figure(fig, path)


def confusion_figure(matrices: dict[str, np.ndarray], classes: Sequence[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.5 * len(matrices), 5), squeeze=False)
    for ax, (model, cm) in zip(axes[0], matrices.items()):
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                )
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted"), ax.set_ylabel("actual")
        ax.set_title(f"confusion: {model}", fontsize=10)
    save_figure(fig, path)


def predictions_figure(
    images: np.ndarray, actual: Iterable[int], predicted: dict[str, np.ndarray], classes: Sequence[str], path: Path
) -> None:
    """One column per image; one title line per model, red where that model is wrong."""
    plt = pyplot()
    actual = list(actual)
    n = len(actual)
    fig, axes = plt.subplots(1, n, figsize=(1.5 * n, 2.4), squeeze=False)
    for i in range(n):
        lines = [f"true: {classes[actual[i]]}"]
        wrong = False
        for model, pred in predicted.items():
            lines.append(f"{model}: {classes[pred[i]]}")
            wrong |= pred[i] != actual[i]
        _show(axes[0, i], images[i], "\n".join(lines), color="red" if wrong else "black")
    save_figure(fig, path)
