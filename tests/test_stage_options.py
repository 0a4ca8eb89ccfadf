"""Options a user sets in params.yaml, each taken through its stage on a repo that has run the tiny
config (a private copy per test): selection criteria and pins, the pretraining losses, the MLP
probe head, the scaled learning rates, and evaluate's AUCs against an independent computation."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import CELLS, REPS, cli, tiny_params, write_params


def _stage(repo, *args, **overrides):
    write_params(repo, tiny_params(**overrides))
    out = cli(repo, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _grid(repo):
    with open(repo / "plots" / "select" / "grid.csv") as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def _expected(grid, metric, cells):
    """The rule the README states: the best score (lowest loss / highest accuracy); ties go to the
    larger patch, then the smaller mask ratio."""
    lower = metric in ("val_mse", "val_loss")
    value = {c: float(grid[c][metric]) for c in cells}
    best = min(value.values()) if lower else max(value.values())
    tied = [c for c in cells if value[c] == best]
    return sorted(tied, key=lambda c: (-int(c[1:].split("-")[0]), float(c.split("-m")[1])))[0]


def _repetition_view(grid, metric, k):
    """The grid as repetition k saw it: its own labelled scores (reconstruction has no labels)."""
    return {c: {**row, metric: row.get(f"{metric}_r{k}", row.get(metric))} for c, row in grid.items()}


@pytest.mark.parametrize("metric", ["val_mse", "val_loss", "knn_acc", "probe_acc"])
def test_select_picks_by_each_metric(repro_copy, metric):
    repo = repro_copy
    _stage(repo, "select", **{"select.metric": metric})
    sel = json.loads((repo / "metrics" / "select.json").read_text())
    grid = _grid(repo)
    if metric == "val_loss":  # not in the grid table: read it from each cell's metrics
        for c in CELLS:
            grid[c]["val_loss"] = json.loads((repo / "metrics" / "pretrain" / f"{c}.json").read_text())["val_loss"]
    assert sel["metric"] == metric
    for k in REPS:
        cell = _expected(_repetition_view(grid, metric, k), metric, CELLS)
        assert sel["repetitions"][f"r{k}"]["cell"] == cell, k
        assert json.loads((repo / "models" / "selection" / f"r{k}.json").read_text())["cell"] == cell


def test_the_mask_ratio_pin_chooses_among_that_ratio_only(repro_copy):
    repo = repro_copy
    _stage(repo, "select", mask_ratio=0.75)
    sel = json.loads((repo / "metrics" / "select.json").read_text())
    for k in REPS:
        view = _repetition_view(_grid(repo), "knn_acc", k)
        assert sel["repetitions"][f"r{k}"]["cell"] == _expected(view, "knn_acc", ["p4-m0.75", "p8-m0.75"])


@pytest.mark.parametrize("loss", ["bce", "norm_pix"])
def test_pretraining_losses_through_the_stage(repro_copy, loss):
    repo = repro_copy
    mse = json.loads((repo / "metrics" / "pretrain" / "p4-m0.5.json").read_text())
    _stage(repo, "pretrain", "--patch", "4", "--mask", "0.5", **{"pretrain.loss": loss})
    m = json.loads((repo / "metrics" / "pretrain" / "p4-m0.5.json").read_text())
    assert np.isfinite(m["train_loss"]) and m["train_loss"] != mse["train_loss"]
    if loss == "bce":  # pixels by a sigmoid: comparable with mse's
        assert 0 < m["val_mse"] < 0.5 and m["val_mse"] != mse["val_mse"]
    else:  # norm_pix predicts each patch up to its own mean/std: no honest pixel MSE exists
        assert m.get("val_mse") is None
    ckpt = torch.load(repo / "models" / "mae" / "p4-m0.5.pt", weights_only=True)
    assert ckpt["loss"] == loss


def test_mlp_probe_head_and_scaled_lr(repro_copy):
    repo = repro_copy
    _stage(repo, "probe", **{"probe.head": "mlp", "probe.mlp_hidden": 48, "probe.batch_size": 64})
    from pipeline import checkpoint

    ckpt = checkpoint.load(repo / "models" / "probe" / "r0.pt")
    assert ckpt["head"]["head"] == "mlp" and ckpt["head"]["mlp_hidden"] == 48
    clf = checkpoint.build_classifier(ckpt)
    assert sum(p.numel() for p in clf.head.parameters()) > 32 * 48  # a hidden layer, not a linear map
    assert json.loads((repo / "metrics" / "probe.json").read_text())["val_acc_mean"] > 0.25
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maepipe")
    run = client.search_runs([exp.experiment_id], "tags.stage = 'probe'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.params["probe.head"] == "mlp"
    # Every lr is per 256 images: batch 64 steps at a quarter of it.
    assert float(run.data.params["probe.lr_scaled"]) == pytest.approx(float(run.data.params["probe.lr"]) * 64 / 256)


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney U statistic from average ranks (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_evaluate_aucs_match_an_independent_computation(repro_template):
    from pipeline import checkpoint, prepared

    repo, _ = repro_template
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    d = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    x = torch.as_tensor(d["x_test"]).float() / 255.0
    y = d["y_test"]
    for arm in ("finetune", "probe"):
        for k, seed in enumerate(ev["arms"][arm]["repetitions"]):
            clf = checkpoint.build_classifier(checkpoint.load(repo / "models" / arm / f"r{k}.pt")).eval()
            with torch.no_grad():
                probs = torch.softmax(clf(x), dim=1).numpy()
            per_class = [_rank_auc(y == c, probs[:, c]) for c in range(10)]
            assert seed["auc_macro"] == pytest.approx(np.mean(per_class), abs=1e-4), (arm, k)
            if k == 0:
                assert list(ev["arms"][arm]["auc_per_class"].values()) == pytest.approx(per_class, abs=1e-4)
            assert seed["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-9)
