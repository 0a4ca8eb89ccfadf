"""The seeds' full-label setting: fine-tune on all 54,000 training labels for about 10 epochs.

One named DVC experiment, `full-labels`, on the default run's encoder (its cell pinned, so no grid
cell and no `pretrain_full` re-runs). With every label, the default's recipe for 100 labels per
class (label smoothing, drop path, flip + shift, layer decay 0.75, 600 steps of 128) underfits: a
single-seed calibration on val reached 0.859 after 4,200 steps of 128. The recipe here was chosen
on val the same way (single seed, 2,100 steps of 256 = 10 epochs): batch 256, no layer decay, no
label smoothing, no drop path, no augmentation reached 0.902. `finetune` and `scratch` share it.

    python studies/full_labels.py run       # the experiment (about 30 minutes on 2 cores)
    python studies/full_labels.py report    # reports/full_labels.{md,json}, per-image predictions
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

NAME = "full-labels"
RECIPE = {
    "downstream.labels_per_class": "all",
    "finetune.batch_size": "256",
    "finetune.steps": "2100",
    "finetune.warmup_steps": "200",
    "finetune.layer_decay": "1.0",
    "finetune.label_smoothing": "0.0",
    "finetune.drop_path": "0.0",
    "finetune.augment": "[]",
}
OUT = ROOT / "reports" / "full_labels"


def run() -> None:
    chosen = json.loads((ROOT / "metrics" / "select.json").read_text())
    pins = {"patch": chosen["patch"], "mask_ratio": chosen["mask_ratio"]}
    sets = [arg for k, v in {**pins, **RECIPE}.items() for arg in ("-S", f"{k}={v}")]
    subprocess.run(["dvc", "exp", "run", "--temp", "-n", NAME, *sets], cwd=ROOT, check=True)


def collect() -> dict:
    ev = json.loads(exps.read_text(NAME, "metrics/evaluate.json"))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "predictions.csv").write_text(exps.read_text(NAME, "plots/evaluate/predictions.csv"))
    return {
        "experiment": NAME,
        "recipe": RECIPE,
        "labels": ev["labels"],
        "seeds": ev["seeds"],
        "arms": {
            a: {k: r[k] for k in ("accuracy_mean", "accuracy_sd", "auc_macro_mean")} for a, r in ev["arms"].items()
        },
        "per_seed": {a: [s["accuracy"] for s in r["seeds"]] for a, r in ev["arms"].items()},
        "comparisons": {
            n: {k: c[k] for k in ("diff", "ci_low", "ci_high", "mcnemar_p_max")} for n, c in ev["comparisons"].items()
        },
    }


def write_report(result: dict) -> None:
    arms = [
        {
            "arm": a,
            "test accuracy (mean ± sd)": f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
            "per seed": " / ".join(f"{x:.4f}" for x in result["per_seed"][a]),
            "macro AUC": f"{r['auc_macro_mean']:.4f}",
        }
        for a, r in result["arms"].items()
    ]
    comps = [
        {
            "comparison": n,
            "difference": f"{c['diff'] * 100:+.2f} points",
            "95 % CI": f"[{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]",
            "McNemar p (max over seeds)": f"{c['mcnemar_p_max']:.2g}",
        }
        for n, c in result["comparisons"].items()
    ]
    report.write_json(result, ROOT / "reports" / "full_labels.json")
    report.write_markdown_table(
        arms,
        ROOT / "reports" / "full_labels.md",
        f"All {result['labels']} training labels, {len(result['seeds'])} seeds; Fashion-MNIST test split; "
        f"experiment `{NAME}` ({' '.join(f'{k}={v}' for k, v in RECIPE.items())})",
        extra=[("Paired differences (bootstrap over test images and seeds)", comps)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "report"))
    if parser.parse_args().what == "run":
        run()
    else:
        write_report(collect())


if __name__ == "__main__":
    main()
