"""Data-parallel training under torchrun, for real: 2 CPU processes with the gloo backend."""

import json
import sys

import pytest
from conftest import cli, make_repo, mlflow_runs, sh, tiny_params, write_params

CELL = "p8-m0.75"


def torchrun(repo, *args, check=True):
    return sh(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            *args,
        ],
        repo,
        check=check,
        PYTHONPATH=str(repo),
    )


def pretrain_metrics(repo, launcher):
    launcher(repo, "pretrain", "--patch", "8", "--mask", "0.75")
    return json.loads((repo / "metrics" / "pretrain" / f"{CELL}.json").read_text())


def test_two_processes_match_one_and_write_once(tmp_path):
    params = tiny_params(**{"grid.patch": [8], "grid.mask_ratio": [0.75], "repetitions": [0]})
    repo = make_repo(tmp_path / "repo", params)
    assert cli(repo, "data").returncode == 0 and cli(repo, "budget").returncode == 0
    one = lambda r, *a: cli(r, *a, check=True)  # noqa: E731
    single = pretrain_metrics(repo, one)
    write_params(repo, {**params, "seed": 1})
    reseeded = pretrain_metrics(repo, one)
    write_params(repo, params)
    parallel = pretrain_metrics(repo, torchrun)
    # Same init and the same global batches in the same order; each process draws the masks for
    # its half of a batch, so only the masks differ. That mask noise must stay far below what a
    # different seed changes, and within 1% of the loss.
    for key in ("train_loss", "val_mse"):
        spread = abs(reseeded[key] - single[key])
        assert abs(parallel[key] - single[key]) <= 0.01 * single[key], (key, single, parallel)
        assert abs(parallel[key] - single[key]) <= 0.25 * spread, (key, single, reseeded, parallel)

    assert cli(repo, "select").returncode == 0
    torchrun(repo, "pretrain_full", "--rep", "0")
    # The classifier stages, once in one process and once in two, from the same encoder.
    alone = {}
    for stage in ("probe", "finetune"):
        cli(repo, stage, check=True)
        alone[stage] = json.loads((repo / "metrics" / f"{stage}.json").read_text())
    torchrun(repo, "probe")
    torchrun(repo, "finetune")
    for stage in ("probe", "finetune"):
        both = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        # Same batches, averaged gradients: only BatchNorm statistics (per process) and, in the
        # fine-tune, each process's own augmentation of its slice differ.
        assert both["val_loss_mean"] == pytest.approx(alone[stage]["val_loss_mean"], rel=0.01), stage
        assert both["val_acc_mean"] == pytest.approx(alone[stage]["val_acc_mean"], abs=0.02), stage
    for stage in ("probe", "finetune"):  # the random-weight controls evaluate also scores
        assert cli(repo, stage, "--init", "random").returncode == 0
    assert cli(repo, "evaluate").returncode == 0, "checkpoints written under torchrun must load"
    _, runs = mlflow_runs(repo)
    names = [r.info.run_name for r in runs]
    # One MLflow run per invocation, from rank 0 only.
    assert names.count(f"pretrain-{CELL}") == 3 and names.count(f"pretrain_full-r0-{CELL}") == 1
    assert names.count(f"probe-{CELL}") == 2 and names.count(f"finetune-{CELL}") == 2
    # Rank 0 wrote the model it validated: loaded in one process, the checkpoint scores the val
    # accuracy the two processes recorded for it.
    import torch

    from pipeline import checkpoint, prepared

    d = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    clf = checkpoint.build_classifier(checkpoint.load(repo / "models" / "finetune" / "r0.pt")).eval()
    with torch.no_grad():
        pred = clf(torch.as_tensor(d["x_val"]).float() / 255.0).argmax(1).numpy()
    recorded = json.loads((repo / "metrics" / "finetune.json").read_text())["repetitions"][0]["val_acc"]
    assert float((pred == d["y_val"]).mean()) == pytest.approx(recorded, abs=1e-6)

    out = torchrun(repo, "select", check=False)
    assert out.returncode != 0 and "runs in one process" in out.stderr
