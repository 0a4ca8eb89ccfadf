"""The screen study: does any cheap criterion rank grid cells by what they become?

Every patch-4 and patch-7 cell of the grid is taken all the way, as one named DVC experiment each
(`screen-p<P>-m<M>`: the cell pinned, the default's `pretrain_full`, arms and evaluate, with two
repetitions, i.e. two independent pretraining runs of the cell). What a cell becomes is its
fine-tuned **val** accuracy (6,000 labels: a design study may read val; no default choice reads it
from here). The criteria are what the screen can see before any of that compute is spent:

- `val_mse`: pixel MSE on masked val pixels after the screen's short pretraining (no labels);
- `knn_acc`, `probe_acc`: leave-one-out k-NN and k-fold closed-form probe on each repetition's
  budget labels, after the same screen (the default's `select`);
- the same three after a screen four times as long (`screen-rung4`: a second rung of successive
  halving would see these);
- for reference only (it costs the whole pretraining run), the frozen probe of the final encoder.

For each, Spearman's rho against the final fine-tuned accuracy over the cells, with a 95 % bootstrap
interval (cells resampled, and within each cell its pretraining runs) and the exact permutation
p-value (every ordering of the cells), and what it costs in pretraining images processed (the
screen's wall time on an idle machine is in the README, from the default run).

    python studies/screen.py run       # the experiments (hours on 2 cores)
    python studies/screen.py report    # reports/screen.{md,json}, reports/screen/ (per-image predictions)
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import subprocess
import sys

import exps
import numpy as np
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import report, represent  # noqa: E402

PATCHES = (4, 7)
REPS = "[0,1]"
GRID = "[4,7]"
RUNG = 4  # the second rung: this many times the screen's epochs
OUT = ROOT / "reports" / "screen"


def cells() -> list[tuple[int, float]]:
    return [(p, m) for p in PATCHES for m in _params()["grid"]["mask_ratio"]]


def _exp(args: list[str], name: str, targets: list[str] = ()) -> None:
    subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *args, *targets], cwd=ROOT, check=True)


def _params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def run(only: list[str] | None = None) -> None:
    from pipeline.presets import hydra_value

    base = ["-S", f"grid.patch={GRID}", "-S", f"repetitions={REPS}"]
    epochs = _params()["pretrain"]["phases"][0]["epochs"]
    rung = [{"epochs": RUNG * epochs, "augment": []}]
    runs = {
        # The screen alone, then four times longer: only up to `select` (no pretraining run).
        "screen-rung1": (base, ["select"]),
        "screen-rung4": ([*base, "-S", f"pretrain.phases={hydra_value(rung)}"], ["select"]),
        **{f"screen-p{p}-m{m}": ([*base, "-S", f"patch={p}", "-S", f"mask_ratio={m}"], []) for p, m in cells()},
    }
    for name, (args, targets) in runs.items():
        if not only or name in only:
            _exp(args, name, targets)


def _grid(exp: str) -> dict[str, dict]:
    return {r["cell"]: r for r in csv.DictReader(io.StringIO(exps.read_text(exp, "plots/select/grid.csv")))}


def _rho_with_ci(criterion: np.ndarray, finals: np.ndarray, seed: int = 0, n_boot: int = 10_000) -> dict:
    """Spearman's rho of `criterion` [cells] with the mean of `finals` [cells, runs]; a percentile
    bootstrap CI resampling cells and, within each, its runs; the exact permutation p-value."""
    target = finals.mean(1)
    rho = represent.spearman(criterion, target)
    rng = np.random.default_rng(seed)
    n, r = finals.shape
    boot = []
    for _ in range(n_boot):
        pick = rng.integers(0, n, n)
        runs = finals[pick[:, None], rng.integers(0, r, (n, r))].mean(1)
        value = represent.spearman(criterion[pick], runs)
        if np.isfinite(value):
            boot.append(value)
    perms = [represent.spearman(criterion[list(order)], target) for order in itertools.permutations(range(n))]
    p = float(np.mean([abs(x) >= abs(rho) - 1e-12 for x in perms]))
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"rho": rho, "ci_low": float(low), "ci_high": float(high), "p_permutation": p}


def _images() -> dict:
    """Pretraining images each criterion costs, over all cells (deterministic, unlike seconds)."""
    p = _params()
    screen = len(cells()) * p["pretrain"]["phases"][0]["epochs"] * p["pretrain"]["train_limit"]
    full = len(cells()) * len(json.loads(REPS)) * sum(ph["epochs"] for ph in p["pretrain_full"]["phases"]) * 54_000
    return {"screen": screen, "rung4": RUNG * screen, "final": screen + full}


def collect() -> dict:
    images = _images()
    names = [f"p{p}-m{m}" for p, m in cells()]
    finals, probe_final, predictions = [], [], {}
    for name in names:
        ft = json.loads(exps.read_text(f"screen-{name}", "metrics/finetune.json"))
        pr = json.loads(exps.read_text(f"screen-{name}", "metrics/probe.json"))
        finals.append([r["val_acc"] for r in ft["repetitions"]])
        probe_final.append(pr["val_acc_mean"])
        predictions[name] = exps.read_text(f"screen-{name}", "plots/evaluate/predictions.csv")
    finals = np.array(finals)
    rung1, rung4 = _grid("screen-rung1"), _grid("screen-rung4")
    # Reconstruction as a pixel MSE where the loss has one (norm_pix does not: its own val loss).
    recon = "val_mse" if all(rung1[c].get("val_mse") for c in names) else "val_loss"
    sign = {recon: -1.0, "knn_acc": 1.0, "probe_acc": 1.0}  # so that higher means "predicted better"
    criteria = {}
    for rung_name, grid in (("screen", rung1), ("rung4", rung4)):
        for view, s in sign.items():
            values = np.array([s * float(grid[c][view]) for c in names])
            criteria[f"{rung_name} {view}"] = {"values": values.tolist(), "images": images[rung_name]}
    criteria["final encoder's probe (reference: needs the pretraining run)"] = {
        "values": probe_final,
        "images": images["final"],
    }
    for c in criteria.values():
        c.update(_rho_with_ci(np.array(c["values"]), finals))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in predictions.items():
        (OUT / f"predictions_{name}.csv").write_text(text)
    return {
        "cells": names,
        "finetuned_val_acc": finals.tolist(),
        "finetuned_val_acc_mean": finals.mean(1).tolist(),
        "cells_differ": _cells_differ(finals),
        "criteria": criteria,
    }


def _cells_differ(finals: np.ndarray) -> dict:
    """Is there anything to rank? One-way ANOVA of the final accuracies: the spread between the
    cells' means against the spread between pretraining runs of the same cell."""
    from scipy.stats import f_oneway

    test = f_oneway(*finals)
    return {
        "F": float(test.statistic),
        "p": float(test.pvalue),
        "between_cells_range": float(np.ptp(finals.mean(1))),
        "within_cell_run_diff_mean": float(np.abs(finals[:, 0] - finals[:, 1]).mean())
        if finals.shape[1] == 2
        else None,
    }


def write(result: dict) -> None:
    report.write_json(result, ROOT / "reports" / "screen.json")
    cells_rows = [
        {
            "cell": c,
            "fine-tuned val acc (runs)": " / ".join(f"{x:.4f}" for x in runs),
            "mean": f"{np.mean(runs):.4f}",
            **{k.split(" (")[0]: f"{v['values'][i]:+.4f}" for k, v in result["criteria"].items()},
        }
        for i, (c, runs) in enumerate(zip(result["cells"], result["finetuned_val_acc"]))
    ]
    crit_rows = [
        {
            "criterion": k,
            "Spearman rho": f"{v['rho']:+.2f}",
            "95 % CI": f"[{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]",
            "permutation p": f"{v['p_permutation']:.3f}",
            "pretraining images (all cells)": f"{v['images']:,}",
        }
        for k, v in result["criteria"].items()
    ]
    differ = result["cells_differ"]
    differ_rows = [
        {
            "cells' means, max - min (points)": f"{differ['between_cells_range'] * 100:.2f}",
            "two runs of one cell, mean absolute difference (points)": (
                "-"
                if differ["within_cell_run_diff_mean"] is None
                else f"{differ['within_cell_run_diff_mean'] * 100:.2f}"
            ),
            "one-way ANOVA F": f"{differ['F']:.2f}",
            "p": f"{differ['p']:.3f}",
        }
    ]
    report.write_markdown_table(
        crit_rows,
        ROOT / "reports" / "screen.md",
        f"Screen study: how well each criterion ranks {len(result['cells'])} cells by their fine-tuned val "
        "accuracy after the default's pretraining run (2 runs per cell; val_mse signed so that higher "
        "predicts better)",
        extra=[
            ("Is there anything to rank? The cells against their own run-to-run noise", differ_rows),
            ("Every cell", cells_rows),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--only", nargs="*", help="run: just these experiments (e.g. to finish a cut-short study)")
    args = parser.parse_args()
    if args.action == "run":
        run(args.only)
    write(collect())


if __name__ == "__main__":
    main()
