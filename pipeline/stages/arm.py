"""What the four downstream arms (probe, finetune and their random-weight controls probe_random,
scratch) share: one classifier per repetition, trained on that repetition's budget labels with its
encoder, the per-step curve, the MLflow run, and the outputs. Each arm supplies only how one
repetition trains."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import checkpoint, dist, fsutil, loop, prepared, repetition, report, runtime, serving, stats, tracking
from ..params import Params, flatten
from ..resume import Resume, fingerprint
from . import DOWNSTREAM_DATA, METRICS, PLOTS, REPETITIONS, arm_path
from .budget import draw_key

CURVE_POINTS = 10  # validations per repetition, whatever the number of steps


def rounds(steps: int) -> tuple[int, int]:
    """(validations, steps between them): the largest number of validations up to CURVE_POINTS
    that divides `steps`, so every repetition trains exactly `steps` steps."""
    n = max(k for k in range(1, min(CURVE_POINTS, steps) + 1) if steps % k == 0)
    return n, steps // n


def run(
    p: Params,
    arm: str,
    params: dict,
    encoder_of: Callable[[dict, int], tuple[torch.nn.Module | None, object, str]],
    train_one: Callable[..., tuple[torch.nn.Module, dict, list[dict]]],
) -> None:
    """Train `arm` once per repetition on that repetition's training labels and write its outputs.

    `encoder_of(d, k)` -> (pretrained encoder or None, its ViT config, cell, the file it came from)
    for repetition k. `train_one(seed=, encoder=, cfg=, num_classes=, x_train=, y_train=, x_val=,
    y_val=, device=, on_round=, resume=)` builds and trains one classifier, returning (classifier,
    head kwargs, history); `resume` lets a killed stage continue where it was (and skip the
    repetitions it had finished)."""
    device = runtime.setup(p.device, p.seed)
    d = prepared.load_prepared(DOWNSTREAM_DATA)
    reps = repetition.load(REPETITIONS, draw_key(p))
    x_val = runtime.to_device(d["x_val"], device)
    y_val = runtime.to_device(d["y_val"], device)
    params = {
        "seed": p.seed,
        "repetitions": list(p.repetitions),
        "device": p.device,
        "model.pool": p.model.pool,
        **flatten(p.downstream, "downstream."),
        **params,
    }
    cells = [encoder_of(d, rep.k) for rep in reps]
    names = ",".join(sorted({c[2] for c in cells}))
    resumes = [
        Resume.maybe(f"{arm}-r{rep.k}", fingerprint(flatten(p), [DOWNSTREAM_DATA, REPETITIONS, source], arm))
        for rep, (_, _, _, source) in zip(reps, cells)
    ]
    with tracking.start(p.mlflow.experiment, arm, params, p.downstream_dataset, names) as mlrun:
        mlrun.log_dataset(DOWNSTREAM_DATA, f"{p.downstream_dataset}-downstream", "training")
        per_rep, curves = [], []
        for rep, (encoder, cfg, cell, _), resume in zip(reps, cells, resumes):
            curve = []

            def on_round(step, metrics, curve=curve, k=rep.k):
                curve.append({"step": step, **metrics})
                mlrun.log_epoch(step, {f"{name}_r{k}": v for name, v in metrics.items()})

            torch.manual_seed(rep.seed)  # head (and, for the controls, encoder) initialisation
            clf, head, history = train_one(
                seed=rep.seed,
                encoder=encoder,
                cfg=cfg,
                num_classes=len(d["classes"]),
                x_train=runtime.to_device(d["x_train"][rep.train], device),
                y_train=runtime.to_device(d["y_train"][rep.train], device),
                x_val=x_val,
                y_val=y_val,
                device=device,
                on_round=on_round,
                resume=resume,
            )
            if not dist.is_main():
                continue
            dev = _dev_accuracy(clf, d, rep, device)
            _save(mlrun, arm, rep, clf, head, cell=cell, dev_acc=dev, d=d)
            per_rep.append(
                {"repetition": rep.k, "seed": rep.seed, "cell": cell, "labels": int(len(rep.train)), "dev_acc": dev}
                | history[-1]
            )
            curves.append(curve)
        if dist.is_main():
            _write_summary(p, arm, mlrun, per_rep, curves)
    for resume in resumes:
        if resume is not None:
            resume.clear()


def _dev_accuracy(clf, d: dict, rep: repetition.Repetition, device) -> float:
    """Accuracy on the repetition's held-out dev slice: the score the run's own choices use."""
    logits = loop.predict(clf.eval(), runtime.to_device(d["x_train"][rep.dev], device), 512, device)
    return float((logits.argmax(1).cpu().numpy() == d["y_train"][rep.dev]).mean())


def _save(mlrun, arm: str, rep, clf, head: dict, *, cell: str, dev_acc: float, d: dict) -> None:
    """Repetition k's checkpoint, and the same classifier as an MLflow model: loadable and
    servable without this repo."""
    path = arm_path(arm, rep.k)
    checkpoint.save(
        path,
        checkpoint.classifier_payload(
            clf,
            head,
            stage=arm,
            cell=cell,
            repetition=rep.k,
            seed=rep.seed,
            labels=int(len(rep.train)),
            dev_acc=dev_acc,
        ),
    )
    serving.log_to(
        mlrun,
        f"{arm}-r{rep.k}",
        path,
        [str(c) for c in d["classes"]],
        d["x_val"][:2],
        {"arm": arm, "repetition": str(rep.k), "seed": str(rep.seed), "cell": cell, "checkpoint_md5": fsutil.md5(path)},
    )


def _write_summary(p: Params, arm: str, mlrun, per_rep: list[dict], curves: list[list[dict]]) -> None:
    """metrics/<arm>.json (per repetition, mean and sd) and the DVC curve: the mean over
    repetitions at each validation, with each repetition's val accuracy beside it."""
    summary = {
        "labels_per_class": p.downstream.labels_per_class,
        "labels": per_rep[0]["labels"],
        "repetitions": per_rep,
    }
    for name in ("val_acc", "val_loss", "dev_acc"):
        summary[f"{name}_mean"], summary[f"{name}_sd"] = stats.mean_sd([r[name] for r in per_rep])
    mlrun.log_metrics({k: summary[k] for k in ("val_acc_mean", "val_acc_sd", "dev_acc_mean", "dev_acc_sd")})
    report.write_json(summary, METRICS / f"{arm}.json")
    rows = []
    for i, point in enumerate(curves[0]):
        at = [c[i] for c in curves]
        rows.append(
            {
                "step": point["step"],
                **{name: float(np.mean([a[name] for a in at])) for name in point if name != "step"},
                **{f"val_acc_r{r['repetition']}": a["val_acc"] for r, a in zip(per_rep, at)},
            }
        )
    report.write_csv(rows, PLOTS / arm / "curve.csv")
    mlrun.log_artifact(PLOTS / arm / "curve.csv")
    print(
        f"{arm}: val accuracy {summary['val_acc_mean']:.4f} ± {summary['val_acc_sd']:.4f} over {len(per_rep)} "
        f"repetitions of {summary['labels']} training labels (dev {summary['dev_acc_mean']:.4f})"
    )
