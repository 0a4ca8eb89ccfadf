"""Stage `select`: pick the best grid cell (honouring the `patch` / `mask_ratio` pins) by
`select.metric`, and compare what reconstruction and classification would each have chosen."""
import numpy as np

from .. import checkpoint, report, represent, tracking
from ..errors import UserError
from ..params import HIGHER_IS_BETTER, Params, cell_name, check_downstream_size, flatten
from . import IMAGES, METRICS, MODELS, PLOTS, REPORTS, mae_path

# The grid-wide views written for every run, whatever `select.metric` is.
VIEWS = ("val_mse", "knn_acc", "probe_acc")


def _key(metric: str):
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    # Ties (identical numbers) break towards the larger patch, the cheaper model downstream.
    return lambda r: (sign * r[metric], -r["patch"], r["mask_ratio"])


def choose(rows: list[dict], metric: str, patch="auto", mask_ratio="auto") -> dict:
    allowed = [r for r in rows if patch in ("auto", r["patch"]) and mask_ratio in ("auto", r["mask_ratio"])]
    return min(allowed, key=_key(metric))


def run(p: Params) -> None:
    rows = []
    for patch, mask in p.cells():
        cell = cell_name(patch, mask)
        path = METRICS / "pretrain" / f"{cell}.json"
        if not path.is_file():
            raise UserError(f"select: {path} is missing; run `dvc repro` so that every grid cell is pretrained")
        m = report.read_json(path)
        rows.append({"cell": cell, "patch": patch, "mask_ratio": mask,
                     **{k: m[k] for k in ("train_loss", "val_loss", "val_mse", "knn_acc", "probe_acc")}})
    metric = p.select.metric
    best = choose(rows, metric, p.patch, p.mask_ratio)
    check_downstream_size(p, best["patch"])
    for r in rows:
        r["chosen"] = r is best
    # Rank agreement over the whole grid, signed so that +1 means "both call the same cells good".
    neg_mse = [-r["val_mse"] for r in rows]
    agreement = {f"spearman_val_mse_vs_{v}": represent.spearman(neg_mse, [r[v] for r in rows])
                 for v in ("knn_acc", "probe_acc")}
    # Undefined (a constant column, a one-cell grid) is null in JSON, not NaN.
    agreement = {k: (v if np.isfinite(v) else None) for k, v in agreement.items()}
    best_by = {v: choose(rows, v)["cell"] for v in VIEWS}
    params = {"patch": p.patch, "mask_ratio": p.mask_ratio, "grid.patch": list(p.grid.patch),
              "grid.mask_ratio": list(p.grid.mask_ratio), **flatten(p.select, "select.")}
    with tracking.start(p.mlflow.experiment, "select", params, p.data.dataset, best["cell"]) as run:
        checkpoint.copy(mae_path(best["cell"]), MODELS / "best.pt")
        pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
        chosen_at = (p.grid.patch.index(best["patch"]), p.grid.mask_ratio.index(best["mask_ratio"]))
        for view in VIEWS:
            values = np.array([[next(r[view] for r in rows if r["patch"] == pa and r["mask_ratio"] == ma)
                                for ma in p.grid.mask_ratio] for pa in p.grid.patch])
            better = "higher" if view in HIGHER_IS_BETTER else "lower"
            report.heatmap_figure(values, p.grid.patch, p.grid.mask_ratio, chosen_at,
                                  f"{view} per cell ({better} is better; best {best_by[view]}); "
                                  f"boxed: chosen {best['cell']} by {metric} [{pins}]",
                                  IMAGES / "grid" / f"{view}.png", higher_is_better=view in HIGHER_IS_BETTER)
        report.write_csv(rows, PLOTS / "select" / "grid.csv")
        rho = ", ".join(f"{k.split('_vs_')[1]} " + ("undefined" if v is None else f"{v:+.3f}")
                        for k, v in agreement.items())
        report.write_markdown_table(rows, REPORTS / "grid.md",
                                    f"MAE grid: chosen {best['cell']} by {metric} ({pins}); best by "
                                    + ", ".join(f"{v}: {c}" for v, c in best_by.items())
                                    + f"; Spearman rank correlation of -val_mse with {rho}")
        result = {"cell": best["cell"], "patch": best["patch"], "mask_ratio": best["mask_ratio"],
                  "metric": metric, "value": best[metric], "best_by": best_by, **agreement}
        report.write_json(result, METRICS / "select.json")
        run.log_metrics({metric: best[metric], "patch_chosen": best["patch"], "mask_ratio_chosen": best["mask_ratio"],
                         **{k: v for k, v in agreement.items() if v is not None}})
        for view in VIEWS:
            run.log_artifact(IMAGES / "grid" / f"{view}.png")
        run.log_artifact(REPORTS / "grid.md")
