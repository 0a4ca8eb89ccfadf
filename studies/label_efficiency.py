"""The label-efficiency study: what MAE pretraining buys as the label budget grows.

One named DVC experiment per budget (`labels-<N>`: `-S downstream.labels_per_class=N`), each the
whole default protocol at that budget: every repetition draws its own N labels per class, selects
its cell on them (so a budget never borrows another's choice), pretrains its own encoder (DVC's
run cache reuses a pretraining run whenever a repetition's cell is the one it had under another
budget) and trains every arm by the one step rule. The committed default (100 per class) is the
N=100 point.

    python studies/label_efficiency.py run       # the experiments (about 1.5 hours on 2 cores)
    python studies/label_efficiency.py report    # reports/label_efficiency.{md,json}, the figure
    python studies/label_efficiency.py report --budgets 10 100 1000   # what a study cut short has

`report` reads every experiment's `metrics/evaluate.json` and per-image predictions from its git
ref and copies the predictions to `reports/label_efficiency/`, so every interval can be recomputed
from the repository alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import exps
import numpy as np
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import figures, report  # noqa: E402

BUDGETS = ("10", "100", "1000", "all")
DEFAULT = "100"  # the committed default run's budget: read from the workspace, not re-run
ARMS = ("finetune", "scratch", "probe", "probe_random", "pixels_logreg")
PAIRS = (("finetune", "scratch"), ("probe", "probe_random"), ("finetune", "pixels_logreg"))
OUT = ROOT / "reports" / "label_efficiency"


def experiments(budgets=BUDGETS) -> dict[str, str | None]:
    """Budget -> the experiment that holds it (None: the committed default run in the workspace)."""
    return {b: None if b == DEFAULT else f"labels-{b}" for b in budgets}


def run(budgets=BUDGETS) -> None:
    for budget, name in experiments(budgets).items():
        if name is not None:
            sets = ["-S", f"downstream.labels_per_class={budget}"]
            subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *sets], cwd=ROOT, check=True)


def collect(budgets: dict[str, str | None], out=OUT) -> dict:
    return {
        budget: exps.evaluated(exp, out / f"predictions_{budget}.csv", ARMS, PAIRS) for budget, exp in budgets.items()
    }


def write(results: dict, root=ROOT) -> None:
    report.write_json(results, root / "reports" / "label_efficiency.json")
    rows = []
    for budget, r in results.items():
        row = {
            "labels per class": budget,
            "trained on": r["labels"],
            "steps": r["finetune_steps"],
            "run at": r["commit"],
            "cells": ", ".join(r["cells"]),
        }
        for arm in ARMS:
            a = r["arms"][arm]
            row[arm] = f"{a['accuracy_mean']:.4f} ± {a['accuracy_sd']:.4f}"
        for name, c in r["comparisons"].items():
            row[name] = f"{c['diff'] * 100:+.2f} [{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]"
        rows.append(row)
    report.write_markdown_table(
        rows,
        root / "reports" / "label_efficiency.md",
        "Label efficiency: test accuracy (mean ± sd over repetitions, each its own pretraining run "
        "and label subset) and paired differences in points [95 % CI over test images and repetitions]",
    )
    _figure(results, root / "plots" / "images" / "label_efficiency.png")


def _figure(results: dict, path: Path) -> None:
    plt = figures.pyplot()
    x = np.array([r["labels"] for r in results.values()], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in ARMS:
        mean = np.array([r["arms"][arm]["accuracy_mean"] for r in results.values()])
        low = np.array([r["arms"][arm]["ci_low"] for r in results.values()])
        high = np.array([r["arms"][arm]["ci_high"] for r in results.values()])
        ax.plot(x, mean, marker="o", label=arm, linestyle="--" if arm == "pixels_logreg" else "-")
        ax.fill_between(x, low, high, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{int(v):,}" for v in x])
    ax.set_xlabel("labelled training images (10 classes, balanced)")
    ax.set_ylabel("test accuracy")
    ax.set_title("What MAE pretraining buys per label budget (95 % CI: test images x repetitions)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument(
        "--budgets",
        nargs="+",
        choices=BUDGETS,
        default=list(BUDGETS),
        help="only these labels-per-class budgets (a study cut short reports what it has run)",
    )
    args = parser.parse_args()
    budgets = [b for b in BUDGETS if b in args.budgets]
    if args.action == "run":
        run(budgets)
    write(collect(experiments(budgets)))


if __name__ == "__main__":
    main()
