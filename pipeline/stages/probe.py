"""Stage `probe`: each repetition's frozen encoder + a new head (LARS, warm-up + cosine) trained on
that repetition's training labels for `probe.steps_for(labels)` steps.

`init: random` probes an untrained encoder of the same shape: the floor any pretraining must beat."""

from .. import loop, optim, runtime
from ..model import Classifier, Encoder
from ..params import Params, flatten
from . import arm, encoders

NAMES = {"pretrained": "probe", "random": "probe_random"}
KEEP = ("train_loss", "val_loss", "val_acc")


def run(p: Params, init: str = "pretrained") -> None:
    pr = p.probe
    lr = optim.scaled_lr(pr.lr, pr.batch_size)

    def train_one(*, seed, encoder, cfg, num_classes, x_train, y_train, x_val, y_val, device, on_round, resume):
        if encoder is None:
            encoder = Encoder(cfg)
        head = {"num_classes": num_classes, "head": pr.head, "pool": p.model.pool, "mlp_hidden": pr.mlp_hidden}
        clf = Classifier(encoder, **head).to(device)
        clf.encoder.requires_grad_(False)
        clf.encoder.eval()
        # The encoder is frozen and inputs are not augmented, so its features are computed once and
        # the head trains on them: a step costs a matrix multiply, not a ViT forward pass. fp32, as
        # evaluate scores the test images.
        feats = {
            s: loop.predict(clf.features, x, pr.batch_size, device) for s, x in (("train", x_train), ("val", x_val))
        }
        optimizer = optim.make_optimizer(pr.optimizer, optim.param_groups(clf.head, lr, pr.weight_decay), device)
        n_rounds, per_round = arm.rounds(pr.steps_for(len(x_train)))
        history = loop.fit_classifier(
            stage=NAMES[init],
            module=clf.head,
            forward=runtime.distribute(clf.head, device),
            optimizer=optimizer,
            x_train=feats["train"],
            y_train=y_train,
            x_val=feats["val"],
            y_val=y_val,
            epochs=n_rounds,
            steps_per_epoch=per_round,
            batch_size=pr.batch_size,
            warmup_epochs=pr.warmup_steps / per_round,
            device=device,
            seed=seed,
            on_epoch=lambda r, m: on_round(r * per_round, {k: m[k] for k in KEEP}),
            resume=resume,
        )
        return clf, head, [{k: h[k] for k in KEEP} for h in history]

    arm.run(
        p,
        NAMES[init],
        {"init": init, **flatten(pr, "probe."), "probe.lr_scaled": lr},
        encoders.for_arm(p, init),
        train_one,
    )
