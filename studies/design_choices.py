"""Two design choices of the default, measured on val (test is never read here):

- which selection criterion picks the patch-7 cell that fine-tunes best: every patch-7 cell is
  taken through `pretrain_full` and the four arms (`cell-p7-m<M>`: `-S mask_ratio=M`), and its
  grid-screen scores (val_mse, knn_acc, probe_acc) are set beside its fine-tuned and probed val
  accuracy;
- which feature the probe and fine-tune read: the mean of the patch tokens (default) or the CLS
  token (`pool-cls`: `-S model.pool=cls`, with the default's cell pinned so the encoder is the same);
- whether layer-wise lr decay (0.75, MAE's fine-tuning recipe, applied to `scratch` too so the
  comparison stays fair) holds `scratch` back: `no-layer-decay` (`-S finetune.layer_decay=1.0`,
  the same encoder) trains both without it.

    dvc exp run --queue -n cell-p7-m0.3 -S mask_ratio=0.3   # likewise 0.5 and 0.9 (0.7 = default)
    dvc exp run --queue -n pool-cls -S mask_ratio=0.7 -S model.pool=cls
    dvc exp run --queue -n no-layer-decay -S mask_ratio=0.7 -S finetune.layer_decay=1.0
    dvc queue start
    python studies/design_choices.py                        # reports/design_choices.{md,json}
"""

from __future__ import annotations

import json
import sys

import exps
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import report  # noqa: E402

LAYER_DECAY_EXP = "no-layer-decay"
CELL_EXPS = ("cell-p7-m0.3", "cell-p7-m0.5", "cell-p7-m0.9")
POOL_EXP = "pool-cls"


def read(exp: str | None, rel: str) -> dict:
    return json.loads(exps.read_text(exp, rel))


def row(exp: str | None) -> dict:
    sel, full = read(exp, "metrics/select.json"), read(exp, "metrics/pretrain_full.json")
    grid = {r["cell"]: r for r in _grid(exp)}[sel["cell"]]
    out = {
        "experiment": exp or "default",
        "cell": sel["cell"],
        "screen val_mse": grid["val_mse"],
        "screen knn_acc": grid["knn_acc"],
        "screen probe_acc": grid["probe_acc"],
        "pretrain_full val_mse": full["val_mse"],
    }
    for arm in ("finetune", "scratch", "probe", "probe_random"):
        m = read(exp, f"metrics/{arm}.json")
        out[f"{arm} val_acc"] = m["val_acc_mean"]
        out[f"{arm} val_sd"] = m["val_acc_sd"]
    return out


def _grid(exp: str | None) -> list[dict]:
    import csv
    import io

    return [
        {k: (float(v) if k in ("val_mse", "knn_acc", "probe_acc") else v) for k, v in r.items()}
        for r in csv.DictReader(io.StringIO(exps.read_text(exp, "plots/select/grid.csv")))
    ]


def _criterion_study() -> tuple[list[dict], list[dict], str] | None:
    try:
        cells = sorted([row(None), *(row(e) for e in CELL_EXPS)], key=lambda r: r["cell"])
    except SystemExit:  # the cell experiments have not been run
        return None
    best_ft = max(cells, key=lambda r: r["finetune val_acc"])["cell"]
    picks = {
        "val_mse": min(cells, key=lambda r: r["screen val_mse"])["cell"],
        "knn_acc": max(cells, key=lambda r: r["screen knn_acc"])["cell"],
        "probe_acc": max(cells, key=lambda r: r["screen probe_acc"])["cell"],
    }
    crit = [{"criterion": k, "picks": v, "= best fine-tune on val": v == best_ft} for k, v in picks.items()]
    return cells, crit, best_ft


def _layer_decay_study() -> list[dict] | None:
    try:
        rows = [dict(row(None), layer_decay=0.75), dict(row(LAYER_DECAY_EXP), layer_decay=1.0)]
    except SystemExit:
        return None
    keep = ("finetune val_acc", "finetune val_sd", "scratch val_acc", "scratch val_sd")
    return [{"layer_decay": r["layer_decay"], **{k: r[k] for k in keep}} for r in rows]


def main() -> None:
    if len(sys.argv) > 1:
        raise SystemExit(__doc__)
    pools = [dict(row(None), pool="mean"), dict(row(POOL_EXP), pool="cls")]
    keep = (
        "probe val_acc",
        "probe val_sd",
        "finetune val_acc",
        "finetune val_sd",
        "scratch val_acc",
        "probe_random val_acc",
    )
    pool_rows = [{"pool": r["pool"], **{k: r[k] for k in keep}} for r in pools]
    result = {"pool": pools}
    extra = []
    study = _criterion_study()
    if study is not None:
        cells, crit, best_ft = study
        result.update(cells=cells, criterion=crit, best_finetune_cell=best_ft)
        extra = [
            ("Patch-7 cells taken all the way (val accuracy, mean of 3 seeds)", cells),
            ("Which screen criterion picks the cell that fine-tunes best on val", crit),
        ]
    decay = _layer_decay_study()
    if decay is not None:
        result["layer_decay"] = decay
        extra.append(("Layer-wise lr decay in fine-tune and scratch (val accuracy, mean ± sd of 3 seeds)", decay))
    report.write_json(result, ROOT / "reports" / "design_choices.json")
    report.write_markdown_table(
        pool_rows,
        ROOT / "reports" / "design_choices.md",
        "Probe / fine-tune feature: mean of patch tokens vs CLS token (val split, 6,000 images; "
        "encoder and 100 labels per class as in the default; mean of 3 seeds)",
        extra=extra,
    )


if __name__ == "__main__":
    main()
