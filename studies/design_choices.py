"""Three design choices of the default, measured on val (test is never read here):

- which selection criterion picks the patch-7 cell that fine-tunes best: every patch-7 cell is
  taken through `pretrain_full` and the four arms (the default's own cell, and `cell-p7-m<M>`:
  `-S mask_ratio=M` for the others), and its grid-screen scores (val_mse, knn_acc, probe_acc) are
  set beside its fine-tuned and probed val accuracy;
- which feature the probe and fine-tune read: the mean of the patch tokens (default) or the CLS
  token (`pool-cls`: `-S model.pool=cls`, with the default's cell pinned so the encoder is the same);
- whether layer-wise lr decay (MAE's fine-tuning recipe, 0.75; applied to `scratch` too so the
  comparison stays fair) helps at this scale: `layer-decay-0.75` (`-S finetune.layer_decay=0.75`,
  the same encoder) against the default's 1.0 (no decay).

    python studies/design_choices.py run      # queue and run the experiments (about 40 min on 2 cores)
    python studies/design_choices.py report   # reports/design_choices.{md,json}
"""

from __future__ import annotations

import json
import sys

import exps
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import report  # noqa: E402

LAYER_DECAY_EXP, LAYER_DECAY = "layer-decay-0.75", 0.75
POOL_EXP = "pool-cls"
PATCH = 7


def _default_cell() -> dict:
    return json.loads((ROOT / "metrics" / "select.json").read_text())


def _cell_exps() -> dict[str, float]:
    """The patch-7 cells other than the default's, by experiment name."""
    import yaml

    ratios = yaml.safe_load((ROOT / "params.yaml").read_text())["grid"]["mask_ratio"]
    chosen = _default_cell()
    return {f"cell-p{PATCH}-m{r}": r for r in ratios if (PATCH, r) != (chosen["patch"], chosen["mask_ratio"])}


def run() -> None:
    """Queue every experiment of the three studies and run them one at a time (2 cores)."""
    import subprocess

    chosen = _default_cell()
    pin = ["-S", f"patch={chosen['patch']}", "-S", f"mask_ratio={chosen['mask_ratio']}"]
    # Cheapest first (the cells each re-run pretrain_full), so a cut-short run still reports.
    runs = {
        POOL_EXP: [*pin, "-S", "model.pool=cls"],
        LAYER_DECAY_EXP: [*pin, "-S", f"finetune.layer_decay={LAYER_DECAY}"],
    }
    runs.update({name: ["-S", f"patch={PATCH}", "-S", f"mask_ratio={r}"] for name, r in _cell_exps().items()})
    for name, sets in runs.items():
        subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *sets], cwd=ROOT, check=True)


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
        cells = sorted([row(None), *(row(e) for e in _cell_exps())], key=lambda r: r["cell"])
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
        rows = [dict(row(None), layer_decay=1.0), dict(row(LAYER_DECAY_EXP), layer_decay=LAYER_DECAY)]
    except SystemExit:
        return None
    keep = ("finetune val_acc", "finetune val_sd", "scratch val_acc", "scratch val_sd")
    return [{"layer_decay": r["layer_decay"], **{k: r[k] for k in keep}} for r in rows]


def write_report() -> None:
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


def main() -> None:
    if sys.argv[1:] == ["run"]:
        run()
    elif sys.argv[1:] == ["report"]:
        write_report()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
