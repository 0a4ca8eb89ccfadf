"""Stage `select`: score every grid cell on the label budget and pick the one that goes on to
`pretrain_full` (honouring the `patch` / `mask_ratio` pins) by `select.metric`.

Every cell is scored by reconstruction (`val_mse`, from its pretrain stage: no labels) and by how
well its frozen features classify the budget's labelled images, cross-validated inside the budget
(`knn_acc`: leave-one-out cosine k-NN; `probe_acc`: k-fold closed-form linear probe), so the choice
uses no label beyond the budget. Beside them, the floors: a random encoder of every patch size and
the raw pixels (projected to the encoder's width), scored the same way."""

import numpy as np
import torch

from .. import checkpoint, data, figures, loop, report, represent, runtime, tracking
from ..errors import UserError
from ..model import Encoder, pooled_features
from ..params import HIGHER_IS_BETTER, Params, cell_name, check_downstream_size, flatten
from . import DOWNSTREAM_DATA, IMAGES, METRICS, MODELS, PLOTS, REPORTS, adapted_encoder, mae_path

# The grid-wide views written for every run, whatever `select.metric` is.
VIEWS = ("val_mse", "knn_acc", "probe_acc")
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
    d = data.load_prepared(DOWNSTREAM_DATA)
    chosen = _budget_indices(p, d)
    x = runtime.to_device(d["x_train"][chosen], device)
    y = runtime.to_device(d["y_train"][chosen], device).long()
    floors = _score(rows, p, d, x, y, device)

    metric = p.select.metric
    best = choose(rows, metric, p.patch, p.mask_ratio)
    check_downstream_size(p, best["patch"])
    for r in rows:
        r["chosen"] = r is best
    views = [v for v in VIEWS if all(r[v] is not None for r in rows)]
    agreement = _agreement(rows, views)
    best_by = {v: choose(rows, v)["cell"] for v in views}
    for r in rows:
        del r["fits"]
    params = {
        "patch": p.patch,
        "mask_ratio": p.mask_ratio,
        "grid.patch": list(p.grid.patch),
        "grid.mask_ratio": list(p.grid.mask_ratio),
        **flatten(p.select, "select."),
        "downstream.labels_per_class": p.downstream.labels_per_class,
        "labels_used": len(chosen),
    }
    with tracking.start(p.mlflow.experiment, "select", params, p.data.dataset, best["cell"]) as run:
        checkpoint.copy(mae_path(best["cell"]), MODELS / "best.pt")
        _write_heatmaps(rows, views, best, best_by, p)
        report.write_csv(rows, PLOTS / "select" / "grid.csv")
        _write_grid_report(rows, floors, best, best_by, agreement, len(chosen), p)
        report.write_json(_result(best, metric, best_by, chosen, floors, agreement), METRICS / "select.json")
        run.log_metrics(
            {
                metric: best[metric],
                "patch_chosen": best["patch"],
                "mask_ratio_chosen": best["mask_ratio"],
                **{k: v for k, v in agreement.items() if v is not None},
            }
        )
        run.summarise_parent({"encoder": best["cell"], "select.metric": metric}, {})
        for view in views:
            run.log_artifact(IMAGES / "grid" / f"{view}.png")
        run.log_artifact(REPORTS / "grid.md")


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


def _budget_indices(p: Params, d: dict) -> np.ndarray:
    """-> the indices of the training images the cells are scored on (the budget, capped per class)."""
    budget = p.downstream.labels_per_class
    if budget == "all" and len(d["y_train"]) <= SELECT_PER_CLASS * len(d["classes"]):
        return np.arange(len(d["y_train"]))
    per_class = SELECT_PER_CLASS if budget == "all" else min(budget, SELECT_PER_CLASS)
    return data.label_budget(d["y_train"], per_class, p.downstream_seeds()[0], d["classes"])


def _score(rows: list[dict], p: Params, d: dict, x: torch.Tensor, y: torch.Tensor, device) -> list[dict]:
    """Scores every row in place (`fits`, `knn_acc`, `probe_acc`) -> the floors, scored the same way."""
    k = len(d["classes"])
    features = lambda enc: loop.predict(
        lambda im: pooled_features(enc.to(device).eval(), im, p.model.pool), x, 256, device
    )
    for r in rows:
        encoder = adapted_encoder(checkpoint.load(mae_path(r["cell"])), d)
        # A cell whose patch does not tile the downstream images cannot go downstream.
        r["fits"] = encoder is not None
        r.update(_scores(features(encoder), y, k, p) if encoder is not None else {"knn_acc": None, "probe_acc": None})
    floors = []
    for patch in p.grid.patch:
        encoder = adapted_encoder(checkpoint.load(mae_path(cell_name(patch, p.grid.mask_ratio[0]))), d)
        if encoder is not None:
            torch.manual_seed(p.seed)
            floors.append(
                {"floor": f"random encoder, patch {patch}", **_scores(features(Encoder(encoder.cfg)), y, k, p)}
            )
    pixels = represent.pca((x.float() / 255.0).flatten(1), p.model.dim)
    floors.append({"floor": f"raw pixels (PCA to {p.model.dim})", **_scores(pixels, y, k, p)})
    return floors


def _agreement(rows: list[dict], views: list[str]) -> dict:
    """-> Spearman's rho of -val_mse with each labelled view over the grid (None where undefined)."""
    # Rank agreement over the grid, signed so that +1 means "both call the same cells good".
    agreement = {}
    if "val_mse" in views:
        neg_mse = [-r["val_mse"] for r in rows]
        for v in ("knn_acc", "probe_acc"):
            rho = represent.spearman(neg_mse, [r[v] for r in rows]) if v in views else float("nan")
            agreement[f"spearman_val_mse_vs_{v}"] = rho if np.isfinite(rho) else None
    return agreement


def _write_heatmaps(rows: list[dict], views: list[str], best: dict, best_by: dict, p: Params) -> None:
    """Writes one heatmap per view over the grid, the chosen cell boxed, to IMAGES/grid/<view>.png."""
    pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
    chosen_at = (p.grid.patch.index(best["patch"]), p.grid.mask_ratio.index(best["mask_ratio"]))
    for view in views:
        values = np.array(
            [
                [next(r[view] for r in rows if r["patch"] == pa and r["mask_ratio"] == ma) for ma in p.grid.mask_ratio]
                for pa in p.grid.patch
            ]
        )
        better = "higher" if view in HIGHER_IS_BETTER else "lower"
        figures.heatmap_figure(
            values,
            p.grid.patch,
            p.grid.mask_ratio,
            chosen_at,
            f"{view} per cell ({better} is better; best {best_by[view]}); "
            f"boxed: chosen {best['cell']} by {p.select.metric} [{pins}]",
            IMAGES / "grid" / f"{view}.png",
            higher_is_better=view in HIGHER_IS_BETTER,
        )


def _write_grid_report(
    rows: list[dict], floors: list[dict], best: dict, best_by: dict, agreement: dict, labels: int, p: Params
) -> None:
    """Writes REPORTS/grid.md: every cell's scores, what was chosen and why, and the floors."""
    pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
    rho = ", ".join(
        f"{k.split('_vs_')[1]} " + ("undefined" if v is None else f"{v:+.3f}") for k, v in agreement.items()
    )
    twins = f"; {best['cell']} is the same cell as {best['same_as']} (same patches hidden)" if best["same_as"] else ""
    report.write_markdown_table(
        rows,
        REPORTS / "grid.md",
        f"MAE grid: chosen {best['cell']} by {p.select.metric} ({pins}){twins}; best by "
        + ", ".join(f"{v}: {c}" for v, c in best_by.items())
        + (f"; Spearman rank correlation of -val_mse with {rho}" if rho else "")
        + f". knn_acc / probe_acc: {labels} budget labels, cross-validated",
        extra=[("Floors, scored on the same labels", floors)],
    )


def _result(best: dict, metric: str, best_by: dict, chosen: np.ndarray, floors: list[dict], agreement: dict) -> dict:
    """-> the contents of METRICS/select.json: the chosen cell, its score, the floors, the agreement."""
    return {
        "cell": best["cell"],
        "patch": best["patch"],
        "mask_ratio": best["mask_ratio"],
        "same_as": best["same_as"],
        "metric": metric,
        "value": best[metric],
        "best_by": best_by,
        "labels_used": int(len(chosen)),
        "floors": {f["floor"]: {k: f[k] for k in ("knn_acc", "probe_acc")} for f in floors},
        **agreement,
    }
