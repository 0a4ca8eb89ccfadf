"""Two-phase pretraining as one curve, on tiny real runs. (The transfer of a gray encoder to RGB
CIFAR-10 runs through `dvc exp run` in tests/test_presets_e2e.py, as the `transfer-cifar10` preset.)"""

import csv

import pytest
from conftest import cli, mlflow_runs, tiny_params, write_params


def _curve(repo, cell):
    with open(repo / "plots" / "pretrain" / f"{cell}.csv") as f:
        return list(csv.DictReader(f))


def test_two_phase_pretraining_is_one_curve_with_the_boundary_marked(tiny_repo):
    phases = [{"epochs": 1, "augment": []}, {"epochs": 2, "augment": ["shift", "crop"]}]
    write_params(tiny_repo, tiny_params(**{"pretrain.phases": phases}))
    assert cli(tiny_repo, "data").returncode == 0
    out = cli(tiny_repo, "pretrain", "--patch", "8", "--mask", "0.5")
    assert out.returncode == 0, out.stderr
    two = _curve(tiny_repo, "p8-m0.5")
    assert [(r["epoch"], r["phase"]) for r in two] == [("1", "1"), ("2", "2"), ("3", "2")]
    assert (tiny_repo / "plots" / "images" / "pretrain_curve" / "p8-m0.5.png").stat().st_size > 1000
    client, runs = mlflow_runs(tiny_repo)
    run = next(r for r in runs if r.info.run_name == "pretrain-p8-m0.5")
    assert run.data.params["pretrain.phases"] == "1xnone,2xshift+crop"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "phase")] == [1, 2, 2]

    # The same three epochs without augmentation: epoch 1 is the same computation, the augmented
    # epochs are not (augmentation really reaches the batches, and only from its phase on).
    write_params(tiny_repo, tiny_params(**{"pretrain.phases": [{"epochs": 3, "augment": []}]}))
    assert cli(tiny_repo, "pretrain", "--patch", "8", "--mask", "0.5").returncode == 0
    one = _curve(tiny_repo, "p8-m0.5")
    assert one[0]["train_loss"] == two[0]["train_loss"] and one[0]["val_mse"] == two[0]["val_mse"]
    assert one[1]["train_loss"] != two[1]["train_loss"] and one[2]["train_loss"] != two[2]["train_loss"]


def _study(name):
    import importlib
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "studies"))
    return importlib.import_module(name)


def test_label_efficiency_report_reads_each_budgets_experiment(pinned_template, tmp_path, monkeypatch):
    """The study's report on a repo with an experiment: every number it writes is read from the
    experiment's git ref (or the workspace) and its intervals recomputed from the copied per-image
    predictions."""
    import json

    import numpy as np

    from pipeline import stats

    exps, study = _study("exps"), _study("label_efficiency")
    repo, _, _ = pinned_template
    monkeypatch.setattr(exps, "ROOT", repo)
    # A study cut short reports the budgets it ran; the default's is read from the workspace.
    assert study.experiments(["10", "100"]) == {"10": "labels-10", "100": None}
    # The workspace holds the last experiment's results, so both entries are the `pinned` run.
    results = study.collect({"workspace": None, "pinned": "pinned"}, out=tmp_path / "copied")
    study.write(results, root=tmp_path)
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert results["workspace"] == results["pinned"]
    r = results["pinned"]
    assert r["labels"] == 180 and r["repetitions"] == 2 and r["cells"] == [x["cell"] for x in ev["repetitions"]]
    assert r["arms"]["finetune"]["accuracy_mean"] == ev["arms"]["finetune"]["accuracy_mean"]
    copied = (tmp_path / "copied" / "predictions_pinned.csv").read_text()
    assert copied == (repo / "plots" / "evaluate" / "predictions.csv").read_text()
    rows = [line.split(",") for line in copied.splitlines()]
    header, body = rows[0], rows[1:]
    label = np.array([int(x[header.index("label")]) for x in body])
    correct = np.array([[int(x[header.index(f"probe_r{k}")]) for x in body] for k in (0, 1)]) == label
    again = stats.paired_bootstrap(correct, np.zeros_like(correct), seed=0)
    assert (r["arms"]["probe"]["ci_low"], r["arms"]["probe"]["ci_high"]) == (again["ci_low"], again["ci_high"])
    table = (tmp_path / "reports" / "label_efficiency.md").read_text()
    assert "| pinned |" in table and "finetune-pixels_logreg" in table
    assert (tmp_path / "plots" / "images" / "label_efficiency.png").stat().st_size > 1000


def test_screen_study_statistics():
    """Spearman with its interval and the exact permutation p the screen study reports."""
    import numpy as np

    study = _study("screen")
    finals = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    perfect = study._rho_with_ci(np.array([1.0, 2.0, 3.0, 4.0]), finals, n_boot=200)
    # Only the perfect ordering and its reverse reach |rho| = 1: 2 of the 4! orderings.
    assert perfect["rho"] == 1.0 and perfect["p_permutation"] == 2 / 24
    noisy = np.array([[0.1, 0.3], [0.2, 0.4], [0.3, 0.1], [0.4, 0.2]])
    r = study._rho_with_ci(np.array([1.0, 2.0, 3.0, 4.0]), noisy, n_boot=500)
    assert -1 <= r["ci_low"] <= r["ci_high"] <= 1 and r["p_permutation"] > 2 / 24
    # Anything to rank: by hand, cell means 0.2 / 0.3 / 0.2 / 0.3 (grand 0.25) and runs 0.1 either
    # side: between-cell mean square 2 x 4 x 0.05^2 / 3 over within-cell 8 x 0.1^2 / 4, F = 1/3.
    differ = study._cells_differ(noisy)
    assert differ["F"] == pytest.approx(1 / 3) and 0.5 < differ["p"] < 1
    assert differ["between_cells_range"] == pytest.approx(0.1) and differ["within_cell_run_diff_mean"] == pytest.approx(
        0.2
    )


def test_design_choices_report_reads_each_experiment(pinned_template, tmp_path, monkeypatch):
    """The design-choices report on a repo with an experiment: each row's val accuracies are the
    experiment's own (from its git ref), its difference from the default computed from them."""
    import json

    exps, study = _study("exps"), _study("design_choices")
    repo, _, _ = pinned_template
    monkeypatch.setattr(exps, "ROOT", repo)
    monkeypatch.setattr(study, "EXPERIMENTS", {"pinned": {"patch": 8}})
    rows = study.collect(["pinned"])
    study.write(rows, root=tmp_path)
    default, pinned = rows
    ft = json.loads((repo / "metrics" / "finetune.json").read_text())  # the workspace holds `pinned`
    assert pinned["finetune"]["mean"] == ft["val_acc_mean"] and default["experiment"] == "default"
    assert pinned["finetune"]["minus_default"] == pinned["finetune"]["mean"] - default["finetune"]["mean"]
    assert pinned["changed"] == "patch=8" and len(pinned["probe"]["per_repetition"]) == 2
    table = (tmp_path / "reports" / "design_choices.md").read_text()
    assert "| pinned | patch=8 |" in table and "(the default)" in table

    # The pretraining-length curve: every point read from its run, with its intervals recomputed.
    points = study.curve([None, "pinned"], out=tmp_path / "copied")
    study.write_curve(points, 0.84, root=tmp_path)
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    steps = json.loads((repo / "metrics" / "pretrain_full" / "r0.json").read_text())["steps"]
    assert [p["pretraining_steps"] for p in points] == [steps, steps] and points[0]["arms"] == points[1]["arms"]
    assert points[1]["minus_default"]["finetune"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    fp = points[1]["comparisons"]["finetune-pixels_logreg"]
    assert fp["diff"] == ev["comparisons"]["finetune-pixels_logreg"]["diff"]
    assert (tmp_path / "copied" / "predictions_pinned.csv").read_text() == (
        repo / "plots" / "evaluate" / "predictions.csv"
    ).read_text()
    assert "| pinned |" in (tmp_path / "reports" / "pretraining_length.md").read_text()
    assert (tmp_path / "plots" / "images" / "pretraining_length.png").stat().st_size > 1000


def test_mnist_protocol_report_reads_each_experiment(pinned_template, tmp_path, monkeypatch):
    """The write-up-protocol report: the choice each criterion made and every arm's test accuracy,
    read from the experiment's ref, beside the write-up's own number."""
    import json

    exps, study = _study("exps"), _study("mnist_protocol")
    repo, _, _ = pinned_template
    monkeypatch.setattr(exps, "ROOT", repo)
    results = study.collect(["pinned"], out=tmp_path / "copied")
    study.write(results, root=tmp_path)
    select = json.loads((repo / "metrics" / "select.json").read_text())
    r = results["pinned"]
    assert r["select_metric"] == select["metric"] and r["best_by"] == select["best_by"]
    assert r["commit"] == exps.git("rev-parse", "--short=7", "HEAD").strip()
    table = (tmp_path / "reports" / "mnist_protocol.md").read_text()
    assert "| pinned |" in table and "| the write-up (60,000 digits, one run) |" in table
    # The two choices compared image by image: a run against itself differs by exactly nothing.
    both = {}
    for name in study.EXPERIMENTS:
        (tmp_path / "copied" / f"predictions_{name}.csv").write_text(
            (tmp_path / "copied" / "predictions_pinned.csv").read_text()
        )
        both[name] = r
    compared = study.choices_compared(both, out=tmp_path / "copied")
    assert compared["diff"] == compared["ci_low"] == compared["ci_high"] == 0 and compared["n_seeds"] == 2
    study.write(both, compared, root=tmp_path)
    assert "k-NN choice minus the val-loss choice" in (tmp_path / "reports" / "mnist_protocol.md").read_text()
