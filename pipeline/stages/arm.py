"""What the four downstream arms (probe, finetune and their random-weight controls probe_random,
scratch) share: the label budget, one repetition per downstream seed, the per-step curve, the
MLflow run, and the outputs. Each arm supplies only how one repetition trains."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import checkpoint, data, dist, fsutil, report, runtime, stats, tracking
from ..params import Params, flatten
from . import DOWNSTREAM_DATA, METRICS, PLOTS, arm_path, downstream_encoder

CURVE_POINTS = 10  # validations per repetition, whatever the number of steps


def rounds(steps: int) -> tuple[int, int]:
    """(validations, steps between them): the largest number of validations up to CURVE_POINTS
    that divides `steps`, so every repetition trains exactly `steps` steps."""
    n = max(k for k in range(1, min(CURVE_POINTS, steps) + 1) if steps % k == 0)
    return n, steps // n


def run(p: Params, arm: str, params: dict, train_one: Callable[..., tuple[torch.nn.Module, dict, list[dict]]]) -> None:
    """Train `arm` once per downstream seed on that seed's label budget and write its outputs.

    `train_one(seed=, encoder=, num_classes=, x_train=, y_train=, x_val=, y_val=, device=, on_round=)` builds
    and trains one classifier, returning (classifier, head kwargs, history)."""
    device = runtime.setup(p.device, p.seed)
    d = data.load_prepared(DOWNSTREAM_DATA)
    encoder, cell = downstream_encoder(d)
    x_val = runtime.to_device(d["x_val"], device)
    y_val = runtime.to_device(d["y_val"], device)
    params = {
        "seed": p.seed,
        "device": p.device,
        "model.pool": p.model.pool,
        **flatten(p.downstream, "downstream."),
        **params,
    }
    with tracking.start(p.mlflow.experiment, arm, params, p.downstream_dataset, cell) as mlrun:
        mlrun.log_dataset(DOWNSTREAM_DATA, f"{p.downstream_dataset}-downstream", "training")
        per_seed, curves = [], []
        for k, seed in enumerate(p.downstream_seeds()):
            chosen = data.label_budget(d["y_train"], p.downstream.labels_per_class, seed, d["classes"])
            curve = []

            def on_round(step, metrics, curve=curve, k=k):
                curve.append({"step": step, **metrics})
                mlrun.log_epoch(step, {f"{name}_s{k}": v for name, v in metrics.items()})

            torch.manual_seed(seed)  # head (and, for the controls, encoder) initialisation
            clf, head, history = train_one(
                seed=seed,
                encoder=encoder,
                num_classes=len(d["classes"]),
                x_train=runtime.to_device(d["x_train"][chosen], device),
                y_train=runtime.to_device(d["y_train"][chosen], device),
                x_val=x_val,
                y_val=y_val,
                device=device,
                on_round=on_round,
            )
            if not dist.is_main():
                continue
            _save(mlrun, arm, k, clf, head, cell=cell, seed=seed, labels=len(chosen), d=d)
            per_seed.append({"seed": seed, "labels": int(len(chosen)), **history[-1]})
            curves.append(curve)
        if dist.is_main():
            _write_summary(p, arm, mlrun, per_seed, curves)


def _save(mlrun, arm: str, k: int, clf, head: dict, *, cell: str, seed: int, labels: int, d: dict) -> None:
    """Repetition k's checkpoint, and the same classifier as an MLflow model: loadable and
    servable without this repo."""
    checkpoint.save(
        arm_path(arm, k),
        checkpoint.classifier_payload(clf, head, stage=arm, cell=cell, seed=seed, labels=labels),
    )
    mlrun.log_classifier(
        f"{arm}-s{k}",
        arm_path(arm, k),
        [str(c) for c in d["classes"]],
        d["x_val"][:2],
        {"arm": arm, "seed": str(seed), "cell": cell, "checkpoint_md5": fsutil.md5(arm_path(arm, k))},
    )


def _write_summary(p: Params, arm: str, mlrun, per_seed: list[dict], curves: list[list[dict]]) -> None:
    """metrics/<arm>.json (per seed, mean and sd) and the DVC curve: the mean over repetitions,
    with each repetition's val accuracy beside it."""
    summary = {
        "labels_per_class": p.downstream.labels_per_class,
        "labels": per_seed[0]["labels"],
        "seeds": per_seed,
    }
    for name in ("val_acc", "val_loss"):
        summary[f"{name}_mean"], summary[f"{name}_sd"] = stats.mean_sd([r[name] for r in per_seed])
    mlrun.log_metrics({"val_acc_mean": summary["val_acc_mean"], "val_acc_sd": summary["val_acc_sd"]})
    report.write_json(summary, METRICS / f"{arm}.json")
    rows = []
    for i, point in enumerate(curves[0]):
        at = [c[i] for c in curves]
        rows.append(
            {
                "step": point["step"],
                **{name: float(np.mean([a[name] for a in at])) for name in point if name != "step"},
                **{f"val_acc_s{k}": a["val_acc"] for k, a in enumerate(at)},
            }
        )
    report.write_csv(rows, PLOTS / arm / "curve.csv")
    mlrun.log_artifact(PLOTS / arm / "curve.csv")
