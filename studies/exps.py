"""Reading the files of named DVC experiments (their git refs under refs/exps) from a study."""

from __future__ import annotations

import subprocess
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
    """The commit a run's code and params came from: an experiment's parent, or the workspace's HEAD
    (its results are the committed ones)."""
    return git("rev-parse", "--short=7", f"{ref(exp)}^" if exp else "HEAD").strip()


def evaluated(exp: str | None, predictions_out, arms, pairs) -> dict:
    """One run's test results as the studies report them: each arm's accuracy (mean ± sd over
    repetitions, and a 95 % CI recomputed from the per-image predictions, which are copied to
    `predictions_out` so the repository alone can recompute it) and the paired differences
    `evaluate` computed, with the cells each repetition chose."""
    import csv
    import io
    import json
    import sys

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline import stats

    ev = json.loads(read_text(exp, "metrics/evaluate.json"))
    text = read_text(exp, "plots/evaluate/predictions.csv")
    predictions_out.parent.mkdir(parents=True, exist_ok=True)
    predictions_out.write_text(text)
    rows = list(csv.DictReader(io.StringIO(text)))
    label = np.array([int(r["label"]) for r in rows])
    ks = [r["k"] for r in ev["repetitions"]]
    out_arms = {}
    for arm in arms:
        correct = np.array([[int(r[f"{arm}_r{k}"]) for r in rows] for k in ks]) == label[None]
        ci = stats.paired_bootstrap(correct, np.zeros_like(correct), seed=0)
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
