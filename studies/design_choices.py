"""The default's design choices, each measured against the default on val (6,000 labels, which no
default choice reads: these are our choices across runs, made once, and the README says so).

One named DVC experiment per choice, each the whole default protocol (3 repetitions: 3 pretraining
runs and 3 label subsets) with one thing changed:

- `dc-mse`: plain pixel targets (`pretrain.loss=mse`) instead of MAE's per-patch normalised ones;
- `dc-regularised`: MAE's fine-tuning regularisation (label smoothing 0.1, drop path 0.1) in both
  `finetune` and `scratch`;
- `dc-steps-1500`, `dc-steps-3000`, `dc-steps-6000`: the step rule's floor for both arms (where do
  more steps stop helping each arm at 100 labels per class?); the one equal to the default's floor
  is the default itself (DVC's run cache restores it);
- `dc-pretrain-8`, `dc-pretrain-40`: shorter and longer pretraining runs (epochs per run). With the
  default they are also a curve on test (`reports/pretraining_length.{md,json}`,
  `plots/images/pretraining_length.png`): the fine-tune and the probe against the tuned pixel
  floor as pretraining grows, with the paired CIs `evaluate` computed.

    python studies/design_choices.py run      # the experiments (about 2 hours on 2 cores)
    python studies/design_choices.py report   # reports/design_choices.{md,json}
    python studies/design_choices.py report --only dc-mse dc-steps-6000   # those run so far

Each row is the val accuracy of every arm, mean ± sd over the 3 repetitions, and the difference of
its means from the default's (a paired CI needs per-image val predictions, which the arms do not
keep; with 3 repetitions the sd is the noise to read the difference against). The committed
report was run at commit 39e0bdf, whose floor was 1,500 steps: its `default` row is the 1,500-step
point; the floor is 3,000 since (chosen from the steps rows).
"""

from __future__ import annotations

import json
import sys

import exps
import numpy as np
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import figures, report, stats  # noqa: E402

EXPERIMENTS = {
    "dc-mse": {"pretrain.loss": "mse"},
    "dc-regularised": {"finetune.label_smoothing": 0.1, "finetune.drop_path": 0.1},
    "dc-steps-1500": {"finetune.min_steps": 1500},
    "dc-steps-3000": {"finetune.min_steps": 3000},
    "dc-steps-6000": {"finetune.min_steps": 6000},
    "dc-pretrain-8": {"pretrain_full.phases": [{"epochs": 8, "augment": []}]},
    "dc-pretrain-40": {"pretrain_full.phases": [{"epochs": 40, "augment": []}]},
}
ARMS = ("finetune", "scratch", "probe", "probe_random")
# The pretraining-length curve: the default and the dc-pretrain-* experiments, on test.
CURVE_ARMS = ("finetune", "probe", "pixels_logreg")
CURVE_PAIRS = (("finetune", "pixels_logreg"), ("probe", "pixels_logreg"), ("finetune", "scratch"))


def run(names) -> None:
    for name in names:
        exps.run_experiment(name, EXPERIMENTS[name])


def row(exp: str | None) -> dict:
    out = {
        "experiment": exp or "default",
        "changed": ", ".join(f"{k}={v}" for k, v in EXPERIMENTS.get(exp, {}).items()),
    }
    out["cells"] = json.loads(exps.read_text(exp, "metrics/select.json"))["cells"]
    for arm in ARMS:
        m = json.loads(exps.read_text(exp, f"metrics/{arm}.json"))
        out[arm] = {
            "mean": m["val_acc_mean"],
            "sd": m["val_acc_sd"],
            "per_repetition": [r["val_acc"] for r in m["repetitions"]],
        }
    return out


def collect(names) -> list[dict]:
    rows = [row(None), *(row(n) for n in names)]
    base = rows[0]
    for r in rows[1:]:
        for arm in ARMS:
            r[arm]["minus_default"] = r[arm]["mean"] - base[arm]["mean"]
    return rows


def write(rows: list[dict], root=ROOT) -> None:
    report.write_json(rows, root / "reports" / "design_choices.json")
    table = []
    for r in rows:
        line = {"experiment": r["experiment"], "changed": r["changed"] or "(the default)", "cells": r["cells"]}
        for arm in ARMS:
            a = r[arm]
            delta = f" ({100 * a['minus_default']:+.2f})" if "minus_default" in a else ""
            line[arm] = f"{a['mean']:.4f} ± {a['sd']:.4f}{delta}"
        table.append(line)
    report.write_markdown_table(
        table,
        root / "reports" / "design_choices.md",
        "Design choices of the default, on val (6,000 labels): val accuracy, mean ± sd over 3 repetitions "
        "(each its own pretraining run and label subset), and in brackets the difference from the default "
        "in points",
    )


def curve(experiments, out=ROOT / "reports" / "pretraining_length") -> list[dict]:
    """Test accuracy and the paired differences with the pixel floor against the number of steps
    each repetition's pretraining run took, one point per experiment (None: the default)."""
    points = []
    for exp in experiments:
        steps = json.loads(exps.read_text(exp, "metrics/pretrain_full/r0.json"))["steps"]
        point = exps.evaluated(exp, out / f"predictions_{exp or 'default'}.csv", CURVE_ARMS, CURVE_PAIRS)
        points.append({"experiment": exp or "default", "pretraining_steps": steps, **point})
    # Each point against the default, paired: repetition k has the same label subset, head init and
    # batch order in every experiment, and all are scored on the same test images.
    base = exps.correct((out / "predictions_default.csv").read_text(), CURVE_ARMS) if None in experiments else None
    for p in points:
        if base is not None:
            mine = exps.correct((out / f"predictions_{p['experiment']}.csv").read_text(), CURVE_ARMS)
            p["minus_default"] = {
                arm: {k: v for k, v in stats.paired_bootstrap(mine[arm], base[arm], seed=0).items() if k in CI_KEYS}
                for arm in ("finetune", "probe")
            }
    return sorted(points, key=lambda p: p["pretraining_steps"])


CI_KEYS = ("diff", "ci_low", "ci_high")


def write_curve(points: list[dict], target: float | None, root=ROOT) -> None:
    report.write_json({"target": target, "points": points}, root / "reports" / "pretraining_length.json")
    rows = []
    for p in points:
        row = {
            "experiment": p["experiment"],
            "run at": p["commit"],
            "pretraining steps per run": p["pretraining_steps"],
            "fine-tuning steps": p["finetune_steps"],
        }
        for arm in CURVE_ARMS:
            a = p["arms"][arm]
            row[arm] = f"{a['accuracy_mean']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}]"
        for name, c in p["comparisons"].items():
            row[name] = f"{c['diff'] * 100:+.2f} [{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]"
        for arm, c in p.get("minus_default", {}).items():
            row[f"{arm} - default's"] = f"{c['diff'] * 100:+.2f} [{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]"
        rows.append(row)
    report.write_markdown_table(
        rows,
        root / "reports" / "pretraining_length.md",
        "Pretraining length at the default's budget: test accuracy [95 % CI] and paired differences in "
        "points [95 % CI over test images and repetitions], each repetition its own pretraining run",
    )
    plt = figures.pyplot()
    x = np.array([p["pretraining_steps"] for p in points], dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for arm in CURVE_ARMS:
        mean = np.array([p["arms"][arm]["accuracy_mean"] for p in points])
        err = [mean - [p["arms"][arm]["ci_low"] for p in points], [p["arms"][arm]["ci_high"] for p in points] - mean]
        right.errorbar(
            x, mean, yerr=err, marker="o", capsize=3, label=arm, linestyle="--" if arm == "pixels_logreg" else "-"
        )
    if target is not None:
        right.axhline(target, color="gray", linewidth=1, linestyle=":", label=f"pixels, all labels ({target:.3f})")
    for name in ("finetune-pixels_logreg", "probe-pixels_logreg"):
        mean = np.array([p["comparisons"][name]["diff"] for p in points]) * 100
        low = np.array([p["comparisons"][name]["ci_low"] for p in points]) * 100
        high = np.array([p["comparisons"][name]["ci_high"] for p in points]) * 100
        left.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=name)
    left.axhline(0, color="gray", linewidth=1)
    for ax, ylabel in ((left, "difference, points (95 % CI)"), (right, "test accuracy (95 % CI)")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(x, [f"{int(v):,}" for v in x])
        ax.set_xlabel("pretraining steps per run (batch 256)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pretraining length at 100 labels per class (3 repetitions, each its own pretraining run)", fontsize=9)
    figures.save_figure(fig, root / "plots" / "images" / "pretraining_length.png")


def main() -> None:
    action, names = exps.cli(__doc__, EXPERIMENTS)
    if action == "run":
        run(names)
    write(collect(names))
    if any(n.startswith("dc-pretrain-") for n in names):
        full = ROOT / "reports" / "label_efficiency.json"
        target = (
            json.loads(full.read_text())["all"]["arms"]["pixels_logreg"]["accuracy_mean"] if full.exists() else None
        )
        write_curve(curve([None, *(n for n in names if n.startswith("dc-pretrain-"))]), target)


if __name__ == "__main__":
    main()
