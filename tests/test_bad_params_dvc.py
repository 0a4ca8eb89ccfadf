"""A mistyped `-S` value leaves the workspace as it was: the `validate` stage refuses it before
DVC removes any output (issue: bad input is one clear line and nothing changed)."""

import torch
from conftest import sh

# One mistake per section of params.yaml and every cross-field rule; the words of its one line.
BAD = [
    (["seed=-1"], "seed = -1: must be an integer from 0"),
    (["device=tpu"], "device = 'tpu': must be one of"),
    (["compile=maybe"], "compile = 'maybe': must be auto, true or false"),
    (["patch=5"], "patch = 5: not in grid.patch [4, 8]"),
    (["mask_ratio=0.6"], "mask_ratio = 0.6: not in grid.mask_ratio [0.5, 0.75]"),
    (["grid.patch=[4,5]"], "grid.patch = 5: must divide data.image_size = 16"),
    (["grid.mask_ratio=[0.1]"], "grid.mask_ratio = 0.1: with patch 8 (4 patches) it leaves 4 visible"),
    (["data.val_fraction=1.5"], "data.val_fraction = 1.5"),
    (["model.heads=3"], "model.heads = 3: must divide model.dim = 32"),
    (["pretrain.lr=-1"], "pretrain.lr = -1: must be a positive number"),
    (["+pretrain.epoch=3"], "pretrain.epoch: unknown key"),
    (
        ["pretrain.phases=[{epochs:1,augment:[flip]}]"],
        "pretrain.phases[0].augment = ['flip']: flip is not allowed for digits",
    ),
    (["pretrain.loss=norm_pix", "select.metric=val_mse"], "select.metric = 'val_mse' with pretrain.loss = 'norm_pix'"),
    (
        ["pretrain.loss=norm_pix", "select.metric=val_loss", "grid.patch=[1,4]"],
        "grid.patch = 1: norm_pix normalises each patch by its own std",
    ),
    (["select.metric=accuracy"], "select.metric = 'accuracy'"),
    (["pretrain_full.lr=0"], "pretrain_full.lr = 0: must be a positive number"),
    (["downstream.labels_per_class=0"], "downstream.labels_per_class = 0"),
    (["patch=8", "downstream.image_size=20"], "downstream.image_size = 20: the selected encoder has patch 8"),
    (["probe.warmup_steps=100"], "probe.warmup_steps = 100: must be less than probe.steps = 30"),
    (["finetune.augment=[flip]"], "finetune.augment = ['flip']: flip is not allowed for digits"),
    (["finetune.layer_decay=2"], "finetune.layer_decay = 2: must be a number in (0, 1]"),
    (["mlflow.experiment=''"], "mlflow.experiment = '': must be a non-empty string"),
    # Needs the data: refused by the `budget` stage, which writes only its own persisted marker.
    (["downstream.labels_per_class=500"], "downstream.labels_per_class = 500: class"),
]

if not torch.cuda.is_available():  # a mistake only where there is no GPU
    BAD.append((["device=cuda"], "device = 'cuda': no CUDA GPU is visible"))


def test_every_bad_value_stops_before_any_output_is_removed(repro_copy):
    repo = repro_copy
    for sets, words in BAD:
        args = [a for s in sets for a in ("-S", s)]
        out = sh(["dvc", "exp", "run", *args], repo, check=False)
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if line.startswith("maepipe: error:")]
        assert out.returncode != 0, (sets, text)
        assert len(errors) == 1 and words in errors[0], (sets, text)
        assert "Traceback" not in text, (sets, text)
        changed = sh(["git", "status", "--porcelain"], repo).stdout.splitlines()
        assert changed in ([], [" M params.yaml"]), (sets, changed)
        sh(["git", "checkout", "params.yaml"], repo)
        assert "up to date" in sh(["dvc", "status"], repo).stdout, sets
