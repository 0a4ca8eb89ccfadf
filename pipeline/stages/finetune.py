"""Stage `finetune`: each repetition's encoder + a new head trained end to end on that repetition's
training labels: AdamW, optional layer-wise lr decay, label smoothing and drop path, a batched
augmentation, for `finetune.steps_for(labels)` steps.

`init: random` is the `scratch` control: the same architecture, head, recipe and steps from random
weights, so the gap to `finetune` is what MAE pretraining bought."""

import copy

import torch

from .. import loop, optim, runtime
from ..augment import augment
from ..model import Classifier, Encoder
from ..params import Params, flatten
from . import arm, encoders

NAMES = {"pretrained": "finetune", "random": "scratch"}
KEEP = ("train_loss", "train_acc", "val_loss", "val_acc")


def run(p: Params, init: str = "pretrained") -> None:
    ft = p.finetune
    lr_encoder, lr_head = (optim.scaled_lr(lr, ft.batch_size) for lr in (ft.lr_encoder, ft.lr_head))
    name = NAMES[init]

    def train_one(*, seed, encoder, cfg, num_classes, x_train, y_train, x_val, y_val, device, on_round, resume):
        # Every repetition starts from its pretrained weights (or fresh random ones).
        encoder = Encoder(cfg) if encoder is None else copy.deepcopy(encoder)
        head = {"num_classes": num_classes, "head": ft.head, "pool": p.model.pool, "mlp_hidden": ft.mlp_hidden}
        clf = Classifier(encoder, **head).to(device)
        clf.encoder.set_drop_path(ft.drop_path)
        groups = optim.layer_decay_groups(
            clf.encoder, lr_encoder, ft.weight_decay, ft.layer_decay
        ) + optim.param_groups(clf.head, lr_head, ft.weight_decay)
        optimizer = optim.make_optimizer(ft.optimizer, groups, device)
        net = runtime.Compiled(runtime.distribute(clf, device), runtime.want_compile(p.compile, device), name)
        gen = torch.Generator(device=device).manual_seed(seed + 2)
        n_rounds, per_round = arm.rounds(ft.steps_for(len(x_train)))
        history = loop.fit_classifier(
            stage=name,
            module=clf,
            forward=lambda u8: net(augment(runtime.as_float(u8), ft.augment, gen)),
            eval_forward=lambda u8: clf(runtime.as_float(u8)),
            optimizer=optimizer,
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            epochs=n_rounds,
            steps_per_epoch=per_round,
            batch_size=ft.batch_size,
            warmup_epochs=ft.warmup_steps / per_round,
            device=device,
            seed=seed,
            label_smoothing=ft.label_smoothing,
            on_epoch=lambda r, m: on_round(r * per_round, {k: m[k] for k in KEEP}),
            resume=resume,
            generators=[gen],
        )
        return clf, head, [{k: h[k] for k in KEEP} for h in history]

    arm.run(
        p,
        name,
        {
            "init": init,
            "compile": p.compile,
            **flatten(ft, "finetune."),
            "finetune.lr_encoder_scaled": lr_encoder,
            "finetune.lr_head_scaled": lr_head,
        },
        encoders.for_arm(p, init),
        train_one,
    )
