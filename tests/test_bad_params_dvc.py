"""A mistyped `-S` value leaves the workspace as it was: the `validate` stage refuses it before
DVC removes any output (issue: bad input is one clear line and nothing changed)."""

import torch
from conftest import sh

# Every rule's wording is checked in-process (test_params.py); through `dvc exp run` go one mistake
# of each kind of gate: a plain value, a cross-field rule, an unknown key, a pin, a budget too large
# for the data (validate's early check from the last data run's class counts), and what only this
# machine can tell.
BAD = [
    (["patch=5"], "patch = 5: not in grid.patch [4, 8]"),
    (["+pretrain.epoch=3"], "pretrain.epoch: unknown key"),
    (["pretrain.loss=norm_pix", "select.metric=val_mse"], "select.metric = 'val_mse' with pretrain.loss = 'norm_pix'"),
    (["probe.warmup_steps=100"], "probe.warmup_steps = 100: must be less than probe.min_steps = 30"),
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
