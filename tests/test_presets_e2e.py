"""Every preset in `presets/` runs end to end as the README says (`dvc exp run $(python -m pipeline
preset NAME)`), shrunk to seconds: the preset's own values all reach the stages, only its epoch
and step counts (and what the tiny data cannot hold) are overridden."""

import csv
import json

import pytest
import torch
import yaml
from conftest import ROOT, cli, mlflow_runs, sh, write_cifar, write_idx_dataset

from pipeline.presets import hydra_value, load_preset

PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))


def _shrunk(preset: dict, repo) -> dict:
    """The preset with its epochs and steps cut to what a test can afford; nothing else changes."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    phases = preset.get("pretrain.phases", params["pretrain"]["phases"])
    full_phases = preset.get("pretrain_full.phases", params["pretrain_full"]["phases"])
    out = {
        "pretrain.phases": [{"epochs": 1, "augment": ph["augment"]} for ph in phases],
        "pretrain.train_limit": 300,
        "pretrain.val_limit": 100,
        "pretrain_full.phases": [{"epochs": 1, "augment": ph["augment"]} for ph in full_phases],
        "pretrain_full.train_limit": 300,
        "finetune.min_steps": 6,
        "finetune.epochs": 0.01,
        "finetune.warmup_steps": 1,
        "probe.min_steps": 6,
        "probe.epochs": 0.01,
        "probe.warmup_steps": 1,
        "repetitions": [0],  # one pretraining run and label subset: the preset's values reach it all the same
    }
    if "model.dim" in preset:  # a bigger network: fewer images and smaller batches keep it seconds
        out.update({"finetune.batch_size": 32, "probe.batch_size": 32, "data.train_limit": 400, "data.test_limit": 100})
    if len(preset.get("grid.patch", [])) * len(preset.get("grid.mask_ratio", [1])) > 1:
        # A whole grid of a big network is minutes even shrunk: one of its cells (the grid's values
        # themselves are checked as params in test_params.py).
        out.update({"grid.patch": [4], "grid.mask_ratio": [0.5]})
    if 7 in out.get("grid.patch", preset.get("grid.patch", [])):
        out["data.image_size"] = 28  # patch 7 must divide the image; the tiny config's is 16
    raw = repo / "data" / "raw"
    if preset.get("data.dataset") == "mnist":  # MNIST and CIFAR-10 as format-exact local files
        write_idx_dataset(raw / "mnist", n_train=300, n_test=50)
        write_cifar(raw / "cifar10", per_batch=60)
        out.update({"data.verify_checksums": False, "downstream.labels_per_class": 3})
    elif any("flip" in ph["augment"] for ph in (*phases, *full_phases)):
        # The tiny config's digits refuse a flip (a mirrored digit is not a digit): the preset's
        # intended data, Fashion-MNIST, as format-exact local files.
        write_idx_dataset(raw / "fashion_mnist", n_train=300, n_test=50)
        out.update({"data.dataset": "fashion_mnist", "data.verify_checksums": False, "downstream.labels_per_class": 3})
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_end_to_end(name, repro_copy):
    repo = repro_copy
    preset = load_preset(name)
    shrink = _shrunk(preset, repo)
    printed = cli(repo, "preset", name, check=True).stdout.split()
    overrides = [a for k, v in shrink.items() for a in ("-S", f"{k}={hydra_value(v)}")]
    # The printed preset first, as a user types it, then the shrink (a later -S wins).
    sh(["dvc", "exp", "run", "-n", name, *printed, *overrides], repo)

    applied = yaml.safe_load((repo / "params.yaml").read_text())
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    locked = {}  # every params value some stage of this pipeline ran with, by dotted key
    # (dvc.lock keeps the baseline's stages that the preset's smaller grid no longer has)
    current = set(sh(["dvc", "stage", "list", "--name-only"], repo).stdout.split())
    for name_, stage in lock.items():
        if name_ in current:
            locked.update(_flatten(stage.get("params", {}).get("params.yaml", {})))
    for key, value in preset.items():
        if key in shrink:
            continue
        node = applied
        for part in key.split("."):
            node = node[part]
        assert node == value, key
        if key in locked:  # the value a stage actually ran with
            assert locked[key] == value, key
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(ev["arms"]) == {"probe", "probe_random", "finetune", "scratch", "pixels_logreg"}
    assert sh(["dvc", "status"], repo).stdout.strip() == "Data and pipelines are up to date."
    _check[name](repo, preset)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out[prefix + key] = value
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _vit(repo, rel):
    return torch.load(repo / rel, weights_only=True)


def _check_seed(repo, preset):
    enc = _vit(repo, "models/encoder/r0.pt")["vit"]
    assert (enc["dim"], enc["depth"], enc["heads"]) == (256, 8, 8)
    probe = _vit(repo, "models/probe/r0.pt")
    assert (probe["head"]["head"], probe["head"]["mlp_hidden"]) == ("mlp", preset["probe.mlp_hidden"])
    hidden = [tuple(v.shape) for k, v in probe["state_dict"].items() if k.startswith("head") and v.ndim == 2]
    assert (preset["probe.mlp_hidden"], 256) in hidden  # the MLP head's first layer reads the 256-d feature
    assert json.loads((repo / "metrics" / "evaluate.json").read_text())["labels_per_class"] == "all"


def _check_two_phase(repo, preset):
    assert json.loads((repo / "metrics" / "select.json").read_text())["cells"] == "p7-m0.5"
    # The repetition's pretraining run: the two phases under one schedule, one curve.
    with open(repo / "plots" / "pretrain_full" / "r0.csv") as f:
        assert [r["phase"] for r in csv.DictReader(f)] == ["1", "2"]
    # The grid is the one cell (dvc.lock still lists the baseline's cells, which DVC keeps).
    stages = sh(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    assert [s for s in stages if s.startswith("pretrain@")] == ["pretrain@7-0.5"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["pretrain@7-0.5"]["params"]["params.yaml"]["pretrain"]["loss"] == "bce"
    assert lock["pretrain_full@0"]["params"]["params.yaml"]["pretrain.loss"] == "bce"
    assert torch.load(repo / "models" / "encoder" / "r0.pt", weights_only=True)["loss"] == "bce"


def _check_transfer_cifar10(repo, preset):
    """Pretrained on 1-channel 16x16 MNIST (a 4x4 grid of patch 4); probed and fine-tuned as
    3-channel 32x32 CIFAR-10 (8x8)."""
    mae = _vit(repo, "models/encoder/r0.pt")
    assert (mae["vit"]["channels"], mae["vit"]["image_size"], mae["vit"]["patch"]) == (1, 16, 4)
    for name in ("finetune", "probe", "scratch"):
        vit = _vit(repo, f"models/{name}/r0.pt")["vit"]
        assert (vit["channels"], vit["image_size"], vit["patch"], vit["pos_grid"]) == (3, 32, 4, 4), name
    # The probe keeps the pretrained encoder's weights: its patch embedding is the gray one / 3.
    probe = _vit(repo, "models/probe/r0.pt")["state_dict"]
    w_gray = mae["state_dict"]["encoder.patch_embed.weight"]
    torch.testing.assert_close(probe["encoder.patch_embed.weight"][:, 0::3], w_gray / 3)
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    with open(repo / "plots" / "evaluate" / "predictions.csv") as f:
        test_labels = {int(r["label"]) for r in csv.DictReader(f)}
    cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert set(ev["arms"]["finetune"]["auc_per_class"]) == {cifar[c] for c in test_labels}
    _, runs = mlflow_runs(repo)
    newest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):  # the preset's runs come after the repro's
        newest[r.data.tags["stage"]] = r
    assert newest["pretrain"].data.tags["dataset"] == "mnist"
    assert newest["finetune"].data.tags["dataset"] == "cifar10"


def _check_transfer_digits(repo, preset):
    assert "digits" in (repo / "reports" / "evaluate.md").read_text()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["finetune"]["params"]["params.yaml"]["finetune"]["augment"] == ["shift"]


_check = {
    "seed": _check_seed,
    "two-phase": _check_two_phase,
    "transfer-cifar10": _check_transfer_cifar10,
    "transfer-digits": _check_transfer_digits,
}


def test_every_preset_has_its_end_to_end_check():
    assert sorted(_check) == PRESETS
