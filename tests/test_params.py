import pytest
import yaml
from conftest import ROOT, cli, tiny_params, write_params

from pipeline import params
from pipeline.errors import UserError


def test_committed_params_are_valid():
    p = params.load(ROOT / "params.yaml")
    assert p.cells() == [(7, 0.5), (7, 0.6), (7, 0.75), (7, 0.9)]
    assert params.flatten(p)["pretrain.phases"] == "2xnone" and p.pretrain.epochs == 2
    assert p.downstream.labels_per_class == 100 and p.repetitions == (0, 1, 2)
    assert p.downstream_dataset == p.data.dataset and p.downstream_size == p.data.image_size
    assert params.cell_name(7, 0.5) == "p7-m0.5"


# (override, words the one-line error must contain)
BAD = [
    ({"grid.patch": [4, 5]}, "grid.patch = 5: must divide data.image_size = 16"),
    ({"grid.mask_ratio": [0.5, 1.0]}, "grid.mask_ratio[1] = 1.0: must be a number strictly between 0 and 1"),
    ({"grid.mask_ratio": [0.0]}, "strictly between 0 and 1"),
    ({"grid.mask_ratio": [0.1]}, "grid.mask_ratio = 0.1: with patch 8 (4 patches) it leaves 4 visible"),
    (
        {"data.dataset": "../imagenet"},
        "data.dataset = '../imagenet': must be one of fashion_mnist, mnist, cifar10, digits, or the name of "
        "an image folder under data.raw_dir",
    ),
    ({"data.mode": "cmyk"}, "data.mode = 'cmyk': must be one of auto, gray, rgb"),
    ({"downstream.mode": "rgba"}, "downstream.mode = 'rgba': must be one of auto, gray, rgb"),
    ({"pretrain.loss": "l1"}, "pretrain.loss = 'l1': must be one of mse, norm_pix, bce"),
    ({"device": "tpu"}, "device = 'tpu': must be one of auto, cpu, cuda, mps"),
    ({"compile": "yes"}, "compile = 'yes': must be auto, true or false"),
    ({"compile": 1}, "compile = 1: must be auto, true or false"),
    ({"probe.head": "conv"}, "probe.head = 'conv': must be one of linear, mlp"),
    ({"probe.optimizer": "adagrad"}, "probe.optimizer = 'adagrad': must be one of lars, sgd, adamw"),
    ({"finetune.optimizer": "rmsprop"}, "finetune.optimizer = 'rmsprop'"),
    ({"patch": 2}, "patch = 2: not in grid.patch [4, 8]"),
    ({"mask_ratio": 0.6}, "mask_ratio = 0.6: not in grid.mask_ratio [0.5, 0.75]"),
    ({"pretrain.phases": [{"epochs": 0, "augment": []}]}, "pretrain.phases[0].epochs = 0: must be a positive integer"),
    ({"pretrain.phases": []}, "pretrain.phases = []: must be a non-empty list"),
    ({"pretrain.phases": ["x"]}, "pretrain.phases[0] = 'x': must be a mapping"),
    ({"pretrain.phases": [{"epochs": 1}, {"augment": []}]}, "pretrain.phases[1].epochs: missing (required)"),
    ({"pretrain.phases": [{"epochs": 1, "aug": []}]}, "pretrain.phases[0].aug: unknown key"),
    (
        {"pretrain.phases": [{"epochs": 1, "augment": ["rotate"]}]},
        "pretrain.phases[0].augment[0] = 'rotate': must be one of shift, crop, flip",
    ),
    ({"pretrain.phases": [{"epochs": 1, "augment": "crop"}]}, "pretrain.phases[0].augment = 'crop': must be a list"),
    (
        {"pretrain.phases": [{"epochs": 1, "augment": []}, {"epochs": 1, "augment": ["crop", "flip"]}]},
        "pretrain.phases[1].augment = ['crop', 'flip']: flip is not allowed for digits",
    ),
    ({"select.knn_k": 0}, "select.knn_k = 0: must be a positive integer"),
    ({"pretrain.knn_k": 20}, "pretrain.knn_k: unknown key"),
    ({"select.folds": 1.5}, "select.folds = 1.5: must be a positive integer"),
    ({"downstream.labels_per_class": 0}, "downstream.labels_per_class = 0: must be a positive integer or all"),
    (
        {"downstream.labels_per_class": "many"},
        "downstream.labels_per_class = 'many': must be a positive integer or all",
    ),
    ({"downstream.seeds": 3}, "downstream.seeds: unknown key"),
    ({"repetitions": 3}, "repetitions = 3: must be a non-empty list"),
    ({"repetitions": [0, 0]}, "repetitions = [0, 0]: must not repeat a value"),
    ({"repetitions": [0, -1]}, "repetitions[1] = -1: must be an integer >= 0"),
    ({"downstream.dev_fraction": 0}, "downstream.dev_fraction = 0: must be a number strictly between 0 and 1"),
    ({"finetune.layer_decay": 0}, "finetune.layer_decay = 0: must be a number in (0, 1]"),
    ({"finetune.layer_decay": 1.5}, "finetune.layer_decay = 1.5: must be a number in (0, 1]"),
    ({"finetune.label_smoothing": 1.0}, "finetune.label_smoothing = 1.0: must be a number in [0, 1)"),
    ({"finetune.drop_path": -0.1}, "finetune.drop_path = -0.1: must be a number in [0, 1)"),
    ({"finetune.augment": ["flip"]}, "finetune.augment = ['flip']: flip is not allowed for digits"),
    ({"finetune.augment": ["blur"]}, "finetune.augment[0] = 'blur': must be one of shift, crop, flip"),
    ({"probe.warmup_steps": 30}, "probe.warmup_steps = 30: must be less than probe.min_steps = 30"),
    ({"finetune.warmup_steps": -1}, "finetune.warmup_steps = -1: must be an integer >= 0"),
    (
        {"pretrain_full.phases": [{"epochs": 1, "augment": ["flip"]}]},
        "pretrain_full.phases[0].augment = ['flip']: flip is not allowed for digits",
    ),
    ({"pretrain_full.lr": 0}, "pretrain_full.lr = 0: must be a positive number"),
    ({"pretrain_full.train_limit": -5}, "pretrain_full.train_limit = -5: must be a positive integer"),
    ({"downstream.dataset": "svhn/train"}, "downstream.dataset = 'svhn/train': must be one of fashion_mnist"),
    ({"downstream.image_size": -1}, "downstream.image_size = -1: must be a positive integer"),
    (
        {"patch": 8, "downstream.image_size": 20},
        "downstream.image_size = 20: the selected encoder has patch 8, which must divide",
    ),
    ({"finetune.min_steps": -3}, "finetune.min_steps = -3: must be a positive integer"),
    ({"finetune.epochs": 0}, "finetune.epochs = 0: must be a positive number"),
    ({"finetune.steps": 3}, "finetune.steps: unknown key"),
    (
        {"patch": "auto", "grid.patch": [8], "downstream.image_size": 20},
        "downstream.image_size = 20: the selected encoder has patch 8, which must divide",
    ),
    ({"pretrain.batch_size": 0}, "pretrain.batch_size = 0: must be a positive integer"),
    ({"pretrain.batch_size": 12.5}, "pretrain.batch_size = 12.5: must be a positive integer"),
    ({"pretrain.phases": [{"epochs": True}]}, "pretrain.phases[0].epochs = True: must be a positive integer"),
    ({"pretrain.lr": "fast"}, "pretrain.lr = 'fast': must be a positive number"),
    ({"model.dim": 30}, "model.dim = 30: must be a multiple of 4"),
    ({"model.heads": 3}, "model.heads = 3: must divide model.dim = 32"),
    ({"model.pool": "max"}, "model.pool = 'max'"),
    ({"select.metric": "accuracy"}, "select.metric = 'accuracy'"),
    ({"data.val_fraction": 1.5}, "data.val_fraction = 1.5"),
    ({"grid.patch": []}, "grid.patch = []: must be a non-empty list"),
    ({"grid.patch": [4, 4]}, "must not repeat a value"),
    ({"pretrain.epoch": 3}, "pretrain.epoch: unknown key"),
    ({"seed": 2**32}, "seed = 4294967296: must be an integer from 0 to 2**32 - 2"),
    ({"probe.batch_size": 1}, "probe.batch_size = 1: must be an integer >= 2"),
    (
        {"pretrain.loss": "norm_pix", "select.metric": "val_mse"},
        "select.metric = 'val_mse' with pretrain.loss = 'norm_pix'",
    ),
    (
        {"pretrain.loss": "norm_pix", "select.metric": "val_loss", "grid.patch": [1, 4]},
        "grid.patch = 1: norm_pix normalises each patch by its own std",
    ),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(UserError) as e:
        params.parse(tiny_params(**override))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_train_length_is_one_rule_for_every_budget():
    p = params.parse(tiny_params(**{"finetune.min_steps": 100, "finetune.epochs": 10, "finetune.batch_size": 64}))
    assert p.finetune.steps_for(90) == 100  # a small budget is not starved
    assert p.finetune.steps_for(6_400) == 1_000 and p.finetune.steps_for(6_401) == 1_001  # nor a large one cut


def test_phases_and_downstream_parse():
    p = params.parse(
        tiny_params(
            **{
                "data.dataset": "fashion_mnist",
                "data.image_size": 16,
                "pretrain.phases": [{"epochs": 2}, {"epochs": 3, "augment": ["crop", "flip", "shift"]}],
                "downstream.dataset": "cifar10",
                "downstream.image_size": 32,
                "select.metric": "knn_acc",
            }
        )
    )
    assert p.pretrain.epochs == 5 and p.pretrain.phase_of() == [1, 1, 2, 2, 2]
    assert params.flatten(p)["pretrain.phases"] == "2xnone,3xcrop+flip+shift"
    assert p.downstream_dataset == "cifar10" and p.downstream_size == 32


def test_missing_section_and_key():
    raw = tiny_params()
    del raw["probe"]
    with pytest.raises(UserError, match="params: probe: missing"):
        params.parse(raw)
    raw = tiny_params()
    del raw["model"]["dim"]
    with pytest.raises(UserError, match="params: model.dim: missing"):
        params.parse(raw)


def test_cli_reports_one_line_and_exit_2(tmp_path):
    write_params(tmp_path, tiny_params(**{"grid.patch": [3]}))
    out = cli(tmp_path, "validate")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "maepipe: error: params: grid.patch = 3: must divide data.image_size = 16 (allowed: 1, 2, 4, 8, 16)"
    ]
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_malformed_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [1,\n  device: cpu\n")
    out = cli(tmp_path, "validate")
    assert out.returncode == 2 and "is not valid YAML" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "params.yaml").write_text("- just a list\n")
    out = cli(tmp_path, "validate")
    assert out.returncode == 2 and "must be a mapping" in out.stderr


def test_cli_pretrain_cell_outside_grid(tmp_path):
    write_params(tmp_path, tiny_params())
    out = cli(tmp_path, "pretrain", "--patch", "2", "--mask", "0.5")
    assert out.returncode == 2 and "not in the grid" in out.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "metrics").exists()


def test_seed_preset_is_valid_and_sized_like_the_seeds():
    from pipeline.model import Encoder, ViTConfig, count_parameters
    from pipeline.presets import dvc_set_args, load_preset

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in load_preset("seed").items():
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node[k]
        node[last] = value
    p = params.parse(raw)
    assert (
        p.pretrain.epochs == 10
        and p.pretrain.phases[0].augment == ()
        and p.pretrain.batch_size == 256
        and p.pretrain.lr == 3e-4
    )
    assert p.finetune.lr_encoder == 9.5e-5 and p.finetune.lr_head == 8e-4
    # 10 epochs of batch 256 over every training label (54,000 less the 10 % dev slice).
    assert p.finetune.steps_for(48_600) == 1899
    assert p.downstream.labels_per_class == "all"
    enc = Encoder(ViTConfig(28, 1, 7, p.model.dim, p.model.depth, p.model.heads))
    assert 6.0e6 < count_parameters(enc) < 7.0e6
    args = dvc_set_args("seed")
    assert args[0] == "-S" and "pretrain.train_limit=null" in args


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
def test_every_preset_is_valid_params(name):
    from pipeline.presets import dvc_set_args, load_preset

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in load_preset(name).items():
        *path, last = key.split(".")
        node = raw
        for k in path:
            node = node[k]
        assert last in node, f"{name}: {key} is not a key of params.yaml"
        node[last] = value
    params.parse(raw)
    args = dvc_set_args(name)
    assert args[::2] == ["-S"] * (len(args) // 2)
    # What `dvc exp run -S key=value` does with the text: parse it with Hydra's override grammar.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args[1::2]:
        key = arg.split("=", 1)[0]
        assert parser.parse_override(arg).value() == load_preset(name)[key], arg
