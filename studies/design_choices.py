"""The default's design choices, each measured against the default on val (6,000 labels, which no
default choice reads: these are our choices across runs, made once, and the README says so).

One named DVC experiment per choice, each the whole default protocol (3 repetitions: 3 pretraining
runs and 3 label subsets) with one thing changed back:

- `dc-mse`: plain pixel targets (`pretrain.loss=mse`) instead of MAE's per-patch normalised ones;
- `dc-regularised`: MAE's fine-tuning regularisation (label smoothing 0.1, drop path 0.1) in both
  `finetune` and `scratch`;
- `dc-steps-3000`: twice the fine-tuning steps for both arms (is 1,500 step-bound at 100 labels
  per class?);
- `dc-pretrain-40`: twice the pretraining (40 epochs per pretraining run; what length buys).

    python studies/design_choices.py run      # the experiments (about 1 hour on 2 cores)
    python studies/design_choices.py report   # reports/design_choices.{md,json}
    python studies/design_choices.py report --only dc-regularised dc-steps-3000   # those run so far

Each row is the val accuracy of every arm, mean ± sd over the 3 repetitions, and the difference of
its means from the default's (a paired CI needs per-image val predictions, which the arms do not
keep; with 3 repetitions the sd is the noise to read the difference against).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import exps
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import report  # noqa: E402
from pipeline.presets import hydra_value  # noqa: E402

EXPERIMENTS = {
    "dc-mse": {"pretrain.loss": "mse"},
    "dc-regularised": {"finetune.label_smoothing": 0.1, "finetune.drop_path": 0.1},
    "dc-steps-3000": {"finetune.min_steps": 3000},
    "dc-pretrain-40": {"pretrain_full.phases": [{"epochs": 40, "augment": []}]},
}
ARMS = ("finetune", "scratch", "probe", "probe_random")


def run(names) -> None:
    for name in names:
        sets = EXPERIMENTS[name]
        args = [a for k, v in sets.items() for a in ("-S", f"{k}={hydra_value(v)}")]
        subprocess.run(["dvc", "exp", "run", "--temp", "-n", name, *args], cwd=ROOT, check=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="these experiments, not all four")
    args = parser.parse_args()
    names = args.only or list(EXPERIMENTS)
    if args.action == "run":
        run(names)
    write(collect(names))


if __name__ == "__main__":
    main()
