"""Two-phase pretraining as one curve, on tiny real runs. (The transfer of a gray encoder to RGB
CIFAR-10 runs through `dvc exp run` in tests/test_presets_e2e.py, as the `transfer-cifar10` preset.)"""

import csv

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
