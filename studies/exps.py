"""Reading the files of named DVC experiments (their git refs under refs/exps) from a study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def ref(name: str) -> str:
    """The commit of the newest DVC experiment called `name`."""
    refs = [
        line.split()
        for line in git(
            "for-each-ref", "--sort=-creatordate", "--format=%(objectname) %(refname)", "refs/exps"
        ).splitlines()
    ]
    found = [sha for sha, r in refs if r.rsplit("/", 1)[-1] == name]
    if not found:
        raise SystemExit(f"no DVC experiment named {name}: run it first (see the study's docstring)")
    return found[0]


def read_text(exp: str | None, rel: str) -> str:
    """`rel` in the workspace (exp None: the committed default run) or in experiment `exp`."""
    return (ROOT / rel).read_text() if exp is None else git("show", f"{ref(exp)}:{rel}")


def baseline(exp: str | None) -> str:
    """The commit a run's code and params came from: an experiment's parent, or for the committed
    default the last commit that changed `dvc.lock` (the run its results are from)."""
    if exp:
        return git("rev-parse", "--short=7", f"{ref(exp)}^").strip()
    return git("log", "-1", "--format=%h", "--abbrev=7", "--", "dvc.lock").strip()


def evaluated(exp: str | None, predictions_out, arms, pairs) -> dict:
    """One run's test results as the studies report them: each arm's accuracy (mean ± sd over
    repetitions, and a 95 % CI recomputed from the per-image predictions, which are copied to
    `predictions_out` so the repository alone can recompute it) and the paired differences
    `evaluate` computed, with the cells each repetition chose."""
    import json
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline import stats

    ev = json.loads(read_text(exp, "metrics/evaluate.json"))
    text = read_text(exp, "plots/evaluate/predictions.csv")
    predictions_out.parent.mkdir(parents=True, exist_ok=True)
    predictions_out.write_text(text)
    ks = [r["k"] for r in ev["repetitions"]]
    right = correct(text, arms)
    out_arms = {}
    for arm in arms:
        ci = stats.paired_bootstrap(right[arm], np.zeros_like(right[arm]), seed=0)
        out_arms[arm] = {
            "accuracy_mean": ev["arms"][arm]["accuracy_mean"],
            "accuracy_sd": ev["arms"][arm]["accuracy_sd"],
            "ci_low": ci["ci_low"],
            "ci_high": ci["ci_high"],
        }
    curve = read_text(exp, "plots/finetune/curve.csv").splitlines()
    return {
        "commit": baseline(exp),
        "finetune_steps": int(curve[-1].split(",")[0]),
        "labels": ev["labels"],
        "dev_labels": ev["dev_labels"],
        "repetitions": len(ks),
        "cells": [r["cell"] for r in ev["repetitions"]],
        "arms": out_arms,
        "comparisons": {
            f"{a}-{b}": {
                k: ev["comparisons"][f"{a}-{b}"][k] for k in ("diff", "ci_low", "ci_high", "sd", "mcnemar_p_max")
            }
            for a, b in pairs
        },
    }


def correct(predictions_csv: str, arms) -> dict:
    """Per arm, which test images each repetition got right: a bool array [repetitions, images]
    from `evaluate`'s per-image predictions (columns `<arm>_r<k>`, in repetition order)."""
    import csv
    import io
    import re

    import numpy as np

    rows = list(csv.DictReader(io.StringIO(predictions_csv)))
    label = np.array([int(r["label"]) for r in rows])
    return {
        arm: np.array([[int(r[c]) for r in rows] for c in rows[0] if re.fullmatch(rf"{arm}_r\d+", c)]) == label[None]
        for arm in arms
    }


def run_experiment(name: str, sets: dict, temp: bool = True) -> None:
    """`dvc exp run -n name -S key=value ...` (hydra syntax), in a temporary copy or the workspace."""
    sys.path.insert(0, str(ROOT))
    from pipeline.presets import hydra_value

    args = [a for k, v in sets.items() for a in ("-S", f"{k}={hydra_value(v)}")]
    subprocess.run(["dvc", "exp", "run", *(["--temp"] if temp else []), "-n", name, *args], cwd=ROOT, check=True)


def cli(doc: str, experiments) -> tuple[str, list[str]]:
    """A study's command line: `run` or `report`, and `--only` a subset of its experiments."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--only", nargs="+", choices=list(experiments), help="these experiments, not all")
    args = parser.parse_args()
    return args.action, args.only or list(experiments)
