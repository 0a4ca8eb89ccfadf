"""Stage `select`: pick the best grid cell (honouring the `patch` / `mask_ratio` pins)."""
import numpy as np

from .. import checkpoint, report, tracking
from ..errors import UserError
from ..params import Params, cell_name, flatten
from . import IMAGES, METRICS, MODELS, PLOTS, REPORTS, mae_path

# Lower is better for every selectable metric.


def choose(rows: list[dict], metric: str, patch, mask_ratio) -> dict:
    allowed = [r for r in rows if patch in ("auto", r["patch"]) and mask_ratio in ("auto", r["mask_ratio"])]
    # Ties (identical numbers) break towards the larger patch, the cheaper model downstream.
    return min(allowed, key=lambda r: (r[metric], -r["patch"], r["mask_ratio"]))


def run(p: Params) -> None:
    rows = []
    for patch, mask in p.cells():
        cell = cell_name(patch, mask)
        path = METRICS / "pretrain" / f"{cell}.json"
        if not path.is_file():
            raise UserError(f"select: {path} is missing; run `dvc repro` so that every grid cell is pretrained")
        m = report.read_json(path)
        rows.append({"cell": cell, "patch": patch, "mask_ratio": mask, "train_loss": m["train_loss"],
                     "val_loss": m["val_loss"], "val_mse": m["val_mse"]})
    metric = p.select.metric
    best = choose(rows, metric, p.patch, p.mask_ratio)
    for r in rows:
        r["chosen"] = r is best
    params = {"patch": p.patch, "mask_ratio": p.mask_ratio, "grid.patch": list(p.grid.patch),
              "grid.mask_ratio": list(p.grid.mask_ratio), **flatten(p.select, "select.")}
    with tracking.start(p.mlflow.experiment, "select", params, p.data.dataset, best["cell"]) as run:
        checkpoint.copy(mae_path(best["cell"]), MODELS / "best.pt")
        values = np.array([[next(r[metric] for r in rows if r["patch"] == pa and r["mask_ratio"] == ma)
                            for ma in p.grid.mask_ratio] for pa in p.grid.patch])
        chosen_at = (p.grid.patch.index(best["patch"]), p.grid.mask_ratio.index(best["mask_ratio"]))
        pins = f"patch={p.patch}, mask_ratio={p.mask_ratio}"
        heatmap = IMAGES / "grid_heatmap.png"
        report.heatmap_figure(values, p.grid.patch, p.grid.mask_ratio, chosen_at,
                              f"{metric} per cell (lower is better); chosen {best['cell']} [{pins}]", heatmap)
        report.write_csv(rows, PLOTS / "select" / "grid.csv")
        report.write_markdown_table(rows, REPORTS / "grid.md",
                                    f"MAE grid: {metric}, chosen {best['cell']} ({pins})")
        result = {"cell": best["cell"], "patch": best["patch"], "mask_ratio": best["mask_ratio"],
                  "metric": metric, "value": best[metric]}
        report.write_json(result, METRICS / "select.json")
        run.log_metrics({metric: best[metric], "patch_chosen": best["patch"], "mask_ratio_chosen": best["mask_ratio"]})
        run.log_artifact(heatmap)
        run.log_artifact(REPORTS / "grid.md")
