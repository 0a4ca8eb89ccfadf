"""Stage `probe`: frozen encoder + a new head (LARS, warm-up + cosine) on the downstream data.

`init: random` probes an untrained encoder of the same shape: the floor any pretraining must beat."""
from .. import checkpoint, data, dist, engine, report, tracking
from ..model import Classifier
from ..params import Params, flatten
from . import DOWNSTREAM_DATA, METRICS, MODELS, PLOTS, downstream_encoder

NAMES = {"pretrained": "probe", "random": "probe_random"}


def run(p: Params, init: str = "pretrained") -> None:
    name = NAMES[init]
    device = engine.setup(p.device, p.seed)
    d = data.load_prepared(DOWNSTREAM_DATA)
    encoder, cell = downstream_encoder(d, init)
    pr = p.probe
    head = {"num_classes": len(d["classes"]), "head": pr.head, "pool": p.model.pool, "mlp_hidden": pr.mlp_hidden}
    clf = Classifier(encoder, **head).to(device)
    clf.encoder.requires_grad_(False)
    clf.encoder.eval()
    # The encoder is frozen and inputs are not augmented, so its features are computed once and
    # the head trains on them: an epoch costs a matrix multiply, not a ViT forward pass.
    feats = {s: engine.predict(clf.features, engine.to_device(d[f"x_{s}"], device), pr.batch_size, device,
                               mixed_precision=True)
             for s in ("train", "val")}
    labels = {s: engine.to_device(d[f"y_{s}"], device) for s in ("train", "val")}
    lr = engine.scaled_lr(pr.lr, pr.batch_size)
    optimizer = engine.make_optimizer(pr.optimizer, engine.param_groups(clf.head, lr, pr.weight_decay), device)
    params = {"seed": p.seed, "device": p.device, "model.pool": p.model.pool, "init": init,
              **flatten(p.downstream, "downstream."), **flatten(pr, "probe."), "probe.lr_scaled": lr}
    with tracking.start(p.mlflow.experiment, name, params, p.downstream_dataset, cell) as run:
        curve = []

        def on_epoch(epoch, metrics):
            curve.append({"epoch": epoch, **{k: metrics[k] for k in ("train_loss", "val_loss", "val_acc")}})
            run.log_epoch(epoch, metrics)

        history = engine.fit_classifier(stage=name, module=clf.head, forward=engine.distribute(clf.head, device),
                                        optimizer=optimizer,
                                        x_train=feats["train"], y_train=labels["train"], x_val=feats["val"],
                                        y_val=labels["val"], epochs=pr.epochs, batch_size=pr.batch_size,
                                        warmup_epochs=pr.warmup_epochs, device=device, seed=p.seed,
                                        on_epoch=on_epoch)
        if not dist.is_main():
            return
        final = {k: history[-1][k] for k in ("train_loss", "val_loss", "val_acc")}
        checkpoint.save(MODELS / f"{name}.pt", checkpoint.classifier_payload(clf, head, stage=name, cell=cell))
        report.write_json(final, METRICS / f"{name}.json")
        report.write_csv(curve, PLOTS / name / "curve.csv")
        run.log_artifact(PLOTS / name / "curve.csv")
