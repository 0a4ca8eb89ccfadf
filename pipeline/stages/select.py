"""Stage `select`: score every grid cell on each repetition's label budget and pick, per repetition,
the cell its `pretrain_full@k` pretrains (honouring the `patch` / `mask_ratio` pins) by
`select.metric`.

Every cell is scored by reconstruction (`val_mse`, from its pretrain stage: no labels; `val_loss`
where the loss is norm_pix, which has no honest pixel MSE) and by how
well its frozen features classify the repetition's budget, cross-validated inside it (`knn_acc`:
leave-one-out cosine k-NN; `probe_acc`: k-fold closed-form linear probe). Repetition k reads only
its own budget's labels, so each repetition's choice is one a user with that budget could make.
Beside the cells, the floors: a random encoder of every patch size and the raw pixels (projected
to the encoder's width), scored the same way."""

import json
import re

import numpy as np
import torch

from .. import checkpoint, figures, loop, prepared, repetition, report, represent, runtime, tracking
from ..errors import UserError
from ..fsutil import write_bytes
from ..model import Encoder, pooled_features
from ..params import HIGHER_IS_BETTER, Params, cell_name, check_downstream_size, flatten
from . import (
    DOWNSTREAM_DATA,
    IMAGES,
    METRICS,
    PLOTS,
    REPETITIONS,
    REPORTS,
    architecture_path,
    mae_path,
    selection_path,
)
from .budget import draw_key
from .encoders import adapted

# The grid-wide views written for every run, whatever `select.metric` is: reconstruction (pixel MSE,
# or the loss itself where there is none), then the labelled scores.
VIEWS = ("val_mse", "val_loss", "knn_acc", "probe_acc")
LABELLED = ("knn_acc", "probe_acc")
# Scoring cells needs only a sample of a large budget: at most this many labels per class.
SELECT_PER_CLASS = 1000


def _key(metric: str):
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    # Ties (identical numbers) break towards the larger patch, the cheaper model downstream, then
    # the smaller mask ratio (with few patches two ratios can hide the same count: the same cell).
    return lambda r: (sign * r[metric], -r["patch"], r["mask_ratio"])


def choose(rows: list[dict], metric: str, patch="auto", mask_ratio="auto") -> dict:
    allowed = [
        r
        for r in rows
        if patch in ("auto", r["patch"])
        and mask_ratio in ("auto", r["mask_ratio"])
        and r.get(metric) is not None
        and r.get("fits", True)
    ]
    if not allowed:
        raise UserError(f"select: no grid cell has a {metric} score under patch={patch}, mask_ratio={mask_ratio}")
    return min(allowed, key=_key(metric))


def _scores(features: torch.Tensor, y: torch.Tensor, k: int, p: Params) -> dict:
    return {
        "knn_acc": represent.knn_accuracy(features, y, features, y, k, k=p.select.knn_k, leave_one_out=True),
        "probe_acc": represent.ridge_cv_accuracy(features, y, k, folds=p.select.folds),
    }


def run(p: Params) -> None:
    rows = _grid_rows(p)
    device = runtime.setup(p.device, p.seed)
    d = prepared.load_prepared(DOWNSTREAM_DATA)
    reps = repetition.load(REPETITIONS, draw_key(p))
    scored = [_scoring_subset(rep, d["y_train"]) for rep in reps]
    per_rep, floors = _score(rows, p, d, scored, device)

    metric = p.select.metric
    choices = []
    for rep, cells in zip(reps, per_rep):
        best = choose(cells, metric, p.patch, p.mask_ratio)
        check_downstream_size(p, best["patch"])
        choices.append(
            {"k": rep.k, **{key: best[key] for key in ("cell", "patch", "mask_ratio")}, metric: best[metric]}
        )
    _summarise_rows(rows, per_rep, choices)
    views = [v for v in VIEWS if all(r[v] is not None for r in rows)]
    if "val_mse" in views:  # one reconstruction view: pixel MSE where the loss has it
        views = [v for v in views if v != "val_loss"]
    agreement = _agreement(rows, views)
    best_by = {v: choose(rows, v)["cell"] for v in views}
    params = {
        "patch": p.patch,
        "mask_ratio": p.mask_ratio,
        "grid.patch": list(p.grid.patch),
        "grid.mask_ratio": list(p.grid.mask_ratio),
        **flatten(p.select, "select."),
        "downstream.labels_per_class": p.downstream.labels_per_class,
        "labels_used_per_repetition": len(scored[0]),
    }
    cells = ",".join(c["cell"] for c in choices)
    with tracking.start(p.mlflow.experiment, "select", params, p.data.dataset, cells) as run:
        for c in choices:
            selected = {key: c[key] for key in ("cell", "patch", "mask_ratio")}
            write_bytes(selection_path(c["k"]), (json.dumps(selected) + "\n").encode())
            write_bytes(architecture_path(c["k"]), (json.dumps({"patch": c["patch"]}) + "\n").encode())
        _write_heatmaps(rows, views, choices, best_by, p)
        report.write_csv(rows, PLOTS / "select" / "grid.csv")
        _write_grid_report(rows, floors, choices, best_by, agreement, len(scored[0]), p)
        report.write_json(_result(choices, metric, best_by, scored, floors, agreement), METRICS / "select.json")
        run.log_metrics(
            {
                **{f"{metric}_r{c['k']}": c[metric] for c in choices},
                **{k: v for k, v in agreement.items() if v is not None},
            }
        )
        run.summarise_parent({"encoder": cells, "select.metric": metric}, {})
        for view in views:
            run.log_artifact(IMAGES / "grid" / f"{view}.png")
        run.log_artifact(REPORTS / "grid.md")
    for c in choices:
        print(f"select: repetition {c['k']} takes {c['cell']} ({metric} {c[metric]:.4f})")


def _grid_rows(p: Params) -> list[dict]:
    """-> one row per grid cell with its pretrain metrics and `same_as` (its twin cells)."""
    rows = []
    for patch, mask in p.cells():
        cell = cell_name(patch, mask)
        path = METRICS / "pretrain" / f"{cell}.json"
        if not path.is_file():
            raise UserError(f"select: {path} is missing; run `dvc repro` so that every grid cell is pretrained")
        m = report.read_json(path)
        rows.append(
            {
                "cell": cell,
                "patch": patch,
                "mask_ratio": mask,
                **{k: m.get(k) for k in ("mask_ratio_effective", "train_loss", "val_loss", "val_mse")},
            }
        )
    # Cells that hide the same number of patches are the same computation: say so, never silently.
    for r in rows:
        twins = [
            o["cell"]
            for o in rows
            if o is not r and o["patch"] == r["patch"] and o["mask_ratio_effective"] == r["mask_ratio_effective"]
        ]
        r["same_as"] = ",".join(twins)
    return rows


def _scoring_subset(rep: repetition.Repetition, y_train: np.ndarray) -> np.ndarray:
    """-> the training images repetition `rep` scores cells on: its whole budget, or a
    class-balanced sample of it when the budget holds more than SELECT_PER_CLASS per class."""
    budget = rep.budget
    labels = y_train[budget]
    counts = np.bincount(labels)
    if counts.max() <= SELECT_PER_CLASS:
        return budget
    rng = np.random.default_rng([rep.seed, 2])
    picked = [
        rng.choice(budget[labels == c], size=min(n, SELECT_PER_CLASS), replace=False) for c, n in enumerate(counts) if n
    ]
    return np.sort(np.concatenate(picked))


def _score(rows: list[dict], p: Params, d: dict, scored: list[np.ndarray], device) -> tuple[list, list]:
    """-> (per repetition, the grid rows with that repetition's `fits`, `knn_acc`, `probe_acc`;
    per repetition, the floors scored the same way). Features are computed once per cell, on
    every image any repetition scores on; each repetition reads only its own labels."""
    k = len(d["classes"])
    union = np.unique(np.concatenate(scored))
    x = runtime.to_device(d["x_train"][union], device)
    at = [torch.as_tensor(np.searchsorted(union, s), device=device) for s in scored]
    ys = [runtime.to_device(d["y_train"][s], device).long() for s in scored]

    def features(enc):
        return loop.predict(lambda im: pooled_features(enc.to(device).eval(), im, p.model.pool), x, 256, device)

    per_rep = [[dict(r) for r in rows] for _ in scored]
    for i, r in enumerate(rows):
        encoder = adapted(checkpoint.load(mae_path(r["cell"])), d)
        # A cell whose patch does not tile the downstream images cannot go downstream.
        f = features(encoder) if encoder is not None else None
        for cells, idx, y in zip(per_rep, at, ys):
            cells[i]["fits"] = f is not None
            cells[i].update(_scores(f[idx], y, k, p) if f is not None else dict.fromkeys(LABELLED))
    named = []
    for patch in p.grid.patch:
        encoder = adapted(checkpoint.load(mae_path(cell_name(patch, p.grid.mask_ratio[0]))), d)
        if encoder is not None:
            torch.manual_seed(p.seed)
            named.append((f"random encoder, patch {patch}", features(Encoder(encoder.cfg))))
    pixels = (x.float() / 255.0).flatten(1)
    floors = []
    for idx, y in zip(at, ys):
        # PCA on this repetition's images only (unsupervised, but still its own images).
        pix = represent.pca(pixels[idx], p.model.dim)
        floors.append(
            [{"floor": name, **_scores(f[idx], y, k, p)} for name, f in named]
            + [{"floor": f"raw pixels (PCA to {p.model.dim})", **_scores(pix, y, k, p)}]
        )
    return per_rep, floors


def _summarise_rows(rows: list[dict], per_rep: list[list[dict]], choices: list[dict]) -> None:
    """Each grid row gets the mean of its labelled scores over the repetitions, each repetition's
    score, and which repetitions chose it."""
    for i, r in enumerate(rows):
        for v in LABELLED:
            values = [cells[i][v] for cells in per_rep]
            r[v] = None if any(x is None for x in values) else float(np.mean(values))
            for c, x in zip(choices, values):
                r[f"{v}_r{c['k']}"] = x
        r["chosen_by"] = ",".join(f"r{c['k']}" for c in choices if c["cell"] == r["cell"])


def _agreement(rows: list[dict], views: list[str]) -> dict:
    """-> Spearman's rho of the reconstruction view (-val_mse, or -val_loss) with each labelled view
    (mean over repetitions) over the grid (None where undefined)."""
    # Rank agreement over the grid, signed so that +1 means "both call the same cells good".
    agreement = {}
    recon = next((v for v in ("val_mse", "val_loss") if v in views), None)
    if recon is not None:
        neg = [-r[recon] for r in rows]
        for v in LABELLED:
            rho = represent.spearman(neg, [r[v] for r in rows]) if v in views else float("nan")
            agreement[f"spearman_{recon}_vs_{v}"] = rho if np.isfinite(rho) else None
    return agreement


def _write_heatmaps(rows: list[dict], views: list[str], choices: list[dict], best_by: dict, p: Params) -> None:
    """Writes one heatmap per view over the grid (labelled views: the mean over repetitions), the
    cells some repetition chose boxed, to IMAGES/grid/<view>.png."""
    pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
    chosen_at = sorted({(p.grid.patch.index(c["patch"]), p.grid.mask_ratio.index(c["mask_ratio"])) for c in choices})
    chosen = ",".join(sorted({c["cell"] for c in choices}))
    for view in views:
        values = np.array(
            [
                [next(r[view] for r in rows if r["patch"] == pa and r["mask_ratio"] == ma) for ma in p.grid.mask_ratio]
                for pa in p.grid.patch
            ]
        )
        better = "higher" if view in HIGHER_IS_BETTER else "lower"
        mean = " (mean over repetitions)" if view in LABELLED else ""
        figures.heatmap_figure(
            values,
            p.grid.patch,
            p.grid.mask_ratio,
            chosen_at,
            f"{view}{mean} per cell ({better} is better; best {best_by[view]}); "
            f"boxed: chosen {chosen} by {p.select.metric} [{pins}]",
            IMAGES / "grid" / f"{view}.png",
            higher_is_better=view in HIGHER_IS_BETTER,
        )


def _write_grid_report(
    rows: list[dict], floors: list[list[dict]], choices: list[dict], best_by: dict, agreement: dict, labels: int, p
) -> None:
    """Writes REPORTS/grid.md: every cell's scores, what each repetition chose and why, the floors."""
    pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
    rho = ", ".join(
        f"{k.split('_vs_')[1]} " + ("undefined" if v is None else f"{v:+.3f}") for k, v in agreement.items()
    )
    picked = "; ".join(f"repetition {c['k']}: {c['cell']}" for c in choices)
    table = [{k: v for k, v in r.items() if not re.search(r"_r\d+$", k)} for r in rows]
    report.write_markdown_table(
        table,
        REPORTS / "grid.md",
        f"MAE grid, chosen by {p.select.metric} ({pins}) on each repetition's own {labels} budget labels, "
        f"cross-validated: {picked}. Labelled scores are means over the repetitions; best by "
        + ", ".join(f"{v}: {c}" for v, c in best_by.items())
        + (f"; Spearman rank correlation of -{next(iter(agreement)).split('_vs_')[0][9:]} with {rho}" if rho else ""),
        extra=[("Floors, scored on the same labels (mean over repetitions)", _mean_floors(floors))],
    )


def _mean_floors(floors: list[list[dict]]) -> list[dict]:
    return [
        {
            "floor": f["floor"],
            **{
                v: None if any(fl[i][v] is None for fl in floors) else float(np.mean([fl[i][v] for fl in floors]))
                for v in LABELLED
            },
        }
        for i, f in enumerate(floors[0])
    ]


def _result(choices: list[dict], metric: str, best_by: dict, scored: list, floors: list, agreement: dict) -> dict:
    """-> the contents of METRICS/select.json: each repetition's cell and score, the floors, the
    grid-wide agreement."""
    return {
        "metric": metric,
        "cells": ",".join(c["cell"] for c in choices),
        "repetitions": {
            f"r{c['k']}": {"cell": c["cell"], "value": c[metric], "labels_used": int(len(s))}
            for c, s in zip(choices, scored)
        },
        "best_by": best_by,
        "floors": {f["floor"]: {v: f[v] for v in LABELLED} for f in _mean_floors(floors)},
        **agreement,
    }
