"""Stage `finetune`: the selected encoder + a new head trained end to end (separate learning rates)
on the downstream data.

`init: random` is the `scratch` control: the same encoder shape, head and schedule from random
weights, so the gap to `finetune` is what MAE pretraining bought."""
from .. import checkpoint, data, dist, engine, report, tracking
from ..model import Classifier
from ..params import Params, flatten
from . import DOWNSTREAM_DATA, METRICS, MODELS, PLOTS, downstream_encoder

NAMES = {"pretrained": "finetune", "random": "scratch"}


def run(p: Params, init: str = "pretrained") -> None:
    name = NAMES[init]
    device = engine.setup(p.device, p.seed)
    d = data.load_prepared(DOWNSTREAM_DATA)
    encoder, cell = downstream_encoder(d, init)
    ft = p.finetune
    head = {"num_classes": len(d["classes"]), "head": ft.head, "pool": p.model.pool, "mlp_hidden": ft.mlp_hidden}
    clf = Classifier(encoder, **head).to(device)
    lr_encoder, lr_head = (engine.scaled_lr(lr, ft.batch_size) for lr in (ft.lr_encoder, ft.lr_head))
    groups = (engine.param_groups(clf.encoder, lr_encoder, ft.weight_decay)
              + engine.param_groups(clf.head, lr_head, ft.weight_decay))
    optimizer = engine.make_optimizer(ft.optimizer, groups, device)
    x = {s: engine.to_device(d[f"x_{s}"], device) for s in ("train", "val")}
    y = {s: engine.to_device(d[f"y_{s}"], device) for s in ("train", "val")}
    params = {"seed": p.seed, "device": p.device, "compile": p.compile, "model.pool": p.model.pool, "init": init,
              **flatten(p.downstream, "downstream."), **flatten(ft, "finetune."),
              "finetune.lr_encoder_scaled": lr_encoder, "finetune.lr_head_scaled": lr_head}
    with tracking.start(p.mlflow.experiment, name, params, p.downstream_dataset, cell) as run:
        curve = []

        def on_epoch(epoch, metrics):
            curve.append({"epoch": epoch, **{k: metrics[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}})
            run.log_epoch(epoch, metrics)

        net = engine.Compiled(engine.distribute(clf, device), engine.want_compile(p.compile, device), name)
        history = engine.fit_classifier(stage=name, module=clf, forward=lambda u8: net(engine.as_float(u8)),
                                        eval_forward=lambda u8: clf(engine.as_float(u8)), compiled=net,
                                        optimizer=optimizer, x_train=x["train"], y_train=y["train"],
                                        x_val=x["val"], y_val=y["val"], epochs=ft.epochs,
                                        batch_size=ft.batch_size, warmup_epochs=ft.warmup_epochs,
                                        device=device, seed=p.seed, on_epoch=on_epoch)
        if not dist.is_main():
            return
        final = {k: history[-1][k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
        checkpoint.save(MODELS / f"{name}.pt", checkpoint.classifier_payload(clf, head, stage=name, cell=cell))
        report.write_json(final, METRICS / f"{name}.json")
        report.write_csv(curve, PLOTS / name / "curve.csv")
        run.log_artifact(PLOTS / name / "curve.csv")
