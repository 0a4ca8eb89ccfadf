"""The seeds' studies on tiny real runs: two-phase pretraining as one curve, and transfer of a
gray 16x16 encoder to RGB 32x32 CIFAR-10 (format-exact fixture files) through `dvc repro`."""

import csv
import json

import torch
import yaml
from conftest import cli, make_repo, mlflow_runs, sh, tiny_params, write_cifar, write_params


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


def test_transfer_gray_16px_encoder_to_rgb_32px_cifar10(tmp_path):
    raw = tmp_path / "raw"
    write_cifar(raw / "cifar10", per_batch=20)
    params = tiny_params(
        **{
            "grid.patch": [4],
            "grid.mask_ratio": [0.5],
            "probe.steps": 4,
            "probe.warmup_steps": 1,
            "downstream.labels_per_class": "all",
            "select.metric": "val_mse",
            "data.raw_dir": str(raw),
            "data.verify_checksums": False,
            "downstream.dataset": "cifar10",
            "downstream.image_size": 32,
        }
    )
    repo = make_repo(tmp_path / "repo", params)
    sh(["dvc", "repro"], repo)
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(ev["arms"]) == {"probe", "probe_random", "finetune", "scratch", "pixels_logreg"}
    test_labels = {int(r["label"]) for r in csv.DictReader(open(repo / "plots" / "evaluate" / "predictions.csv"))}
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert set(ev["arms"]["finetune"]["auc_per_class"]) == {cifar[c] for c in test_labels}
    # Pretrained on 1-channel 16x16 (a 4x4 grid of patch 4); fine-tuned as 3-channel 32x32 (8x8).
    mae = torch.load(repo / "models" / "encoder.pt", weights_only=True)
    assert (mae["vit"]["channels"], mae["vit"]["image_size"]) == (1, 16)
    for name in ("finetune", "probe", "scratch"):
        vit = torch.load(repo / "models" / name / "s0.pt", weights_only=True)["vit"]
        assert (vit["channels"], vit["image_size"], vit["patch"], vit["pos_grid"]) == (3, 32, 4, 4), name
    # The probe keeps the pretrained encoder's weights: its patch embedding is the gray one / 3.
    probe = torch.load(repo / "models" / "probe" / "s0.pt", weights_only=True)["state_dict"]
    w_gray = mae["state_dict"]["encoder.patch_embed.weight"]
    torch.testing.assert_close(probe["encoder.patch_embed.weight"][:, 0::3], w_gray / 3)
    _, runs = mlflow_runs(repo)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert by_stage["pretrain"].data.tags["dataset"] == "digits"
    assert by_stage["finetune"].data.tags["dataset"] == "cifar10"
    assert "cifar10" in (repo / "reports" / "evaluate.md").read_text()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    lock_params = lock["data"]["params"]["params.yaml"]
    assert (lock_params["downstream.dataset"], lock_params["downstream.image_size"]) == ("cifar10", 32)
