"""Stage `pretrain@<patch>-<mask>`: one MAE for one grid cell."""
import time

import torch

from .. import checkpoint, data, dist, engine, report, represent, tracking
from ..augment import augment
from ..errors import UserError
from ..model import MAE, ViTConfig, masked_pixel_sse, pooled_features, unpatchify
from ..params import Params, cell_name, check_cell, flatten
from . import IMAGES, METRICS, PLOTS, PRETRAIN_DATA, mae_path

FIGURE_IMAGES = 8


def vit_config(p: Params, patch: int, channels: int, mean, std) -> ViTConfig:
    m = p.model
    return ViTConfig(p.data.image_size, channels, patch, m.dim, m.depth, m.heads, m.mlp_ratio,
                     tuple(float(x) for x in mean), tuple(float(x) for x in std))


def run(p: Params, patch: int, mask_ratio: float) -> None:
    if patch not in p.grid.patch or mask_ratio not in p.grid.mask_ratio:
        raise UserError(f"pretrain: cell patch={patch} mask_ratio={mask_ratio:g} is not in the grid "
                        f"(grid.patch {list(p.grid.patch)}, grid.mask_ratio {list(p.grid.mask_ratio)})")
    check_cell(p, patch, mask_ratio)
    cell = cell_name(patch, mask_ratio)
    device = engine.setup(p.device, p.seed)
    d = data.load_prepared(PRETRAIN_DATA)
    # The train split is already shuffled with the seed, so a prefix is a random subset.
    x_train = engine.to_device(d["x_train"][:p.pretrain.train_limit], device)
    x_val = engine.to_device(d["x_val"][:p.pretrain.val_limit], device)
    cfg = vit_config(p, patch, x_train.shape[1], d["mean"], d["std"])
    m, pt = p.model, p.pretrain
    decoder = {"decoder_dim": m.decoder_dim, "decoder_depth": m.decoder_depth, "decoder_heads": m.decoder_heads}
    mae = MAE(cfg, mask_ratio, loss=pt.loss, **decoder).to(device)
    lr = engine.scaled_lr(pt.lr, pt.batch_size)
    optimizer = engine.make_optimizer("adamw", engine.param_groups(mae, lr, pt.weight_decay), device)
    net = engine.Compiled(engine.distribute(mae, device), engine.want_compile(p.compile, device), f"pretrain {cell}")
    phase_of = pt.phase_of()
    current = {"ops": ()}
    aug_gen = torch.Generator(device=device).manual_seed(p.seed + 2)

    def before_epoch(epoch):
        current["ops"] = pt.phases[phase_of[epoch - 1] - 1].augment

    def step(idx):
        return engine.StepOutput(net(augment(engine.as_float(x_train[idx]), current["ops"], aug_gen))["loss"])

    def validate():
        # The same masks every epoch and for every run: the curve moves only because the model does.
        gen = torch.Generator(device=device).manual_seed(p.seed + 1)
        loss_sum = torch.zeros((), device=device)
        sse = torch.zeros((), device=device)
        pixels = torch.zeros((), device=device)
        for chunk in x_val.split(pt.batch_size):
            out = mae(engine.as_float(chunk), generator=gen)
            loss_sum += out["loss"].float() * len(chunk)
            s, n = masked_pixel_sse(mae.to_pixels(out["pred"], out["target"]), out["target"], out["mask"])
            sse += s
            pixels += n
        return {"val_loss": loss_sum.item() / len(x_val), "val_mse": (sse / pixels).item()}

    params = {"seed": p.seed, "device": p.device, "compile": p.compile, "patch": patch, "mask_ratio": mask_ratio,
              **flatten(p.data, "data."), **flatten(p.model, "model."), **flatten(pt, "pretrain."),
              "pretrain.lr_scaled": lr}
    with tracking.start(p.mlflow.experiment, "pretrain", params, p.data.dataset, cell) as run:
        curve = []

        def on_epoch(epoch, metrics):
            phase = phase_of[epoch - 1]
            curve.append({"epoch": epoch, "phase": phase,
                          **{k: metrics[k] for k in ("train_loss", "val_loss", "val_mse")}})
            run.log_epoch(epoch, {**metrics, "phase": phase})

        start = time.perf_counter()
        history = engine.fit(stage=f"pretrain {cell}", model=mae, optimizer=optimizer,
                             n_train=len(x_train), epochs=pt.epochs, batch_size=pt.batch_size,
                             warmup_epochs=pt.warmup_epochs, device=device, seed=p.seed, step=step,
                             validate=validate, on_epoch=on_epoch, before_epoch=before_epoch, compiled=net)
        seconds = time.perf_counter() - start
        if not dist.is_main():
            return
        final = history[-1]
        metrics = {"patch": patch, "mask_ratio": mask_ratio, "train_loss": final["train_loss"],
                   "val_loss": final["val_loss"], "val_mse": final["val_mse"],
                   **representation_quality(mae, d, p, device)}
        run.log_metrics({"images_per_s": pt.epochs * len(x_train) / seconds, "seconds": seconds,
                         "knn_acc": metrics["knn_acc"], "probe_acc": metrics["probe_acc"]})

        figure = IMAGES / "recon" / f"{cell}.png"
        _reconstruction_figure(mae, x_val[:FIGURE_IMAGES], device, p.seed, cell, metrics["val_mse"], figure)
        checkpoint.save(mae_path(cell), checkpoint.mae_payload(mae, decoder=decoder, cell=cell, metrics=metrics))
        report.write_json(metrics, METRICS / "pretrain" / f"{cell}.json")
        report.write_csv(curve, PLOTS / "pretrain" / f"{cell}.csv")
        curve_figure = IMAGES / "pretrain_curve" / f"{cell}.png"
        report.pretrain_curve_figure(curve, [ph.describe() for ph in pt.phases],
                                     f"MAE {cell}: loss per epoch", curve_figure)
        for path in (figure, curve_figure, PLOTS / "pretrain" / f"{cell}.csv"):
            run.log_artifact(path)


@torch.no_grad()
def representation_quality(mae: MAE, d: dict, p: Params, device) -> dict[str, float]:
    """How well the frozen encoder's features classify val images: cosine k-NN and a closed-form
    linear probe, both fitted on the cell's training images. Labels are used here only to score
    the cell; the encoder never saw them."""
    mae.eval()
    pt = p.pretrain
    feats, labels = {}, {}
    for split, limit in (("train", pt.train_limit), ("val", pt.val_limit)):
        feats[split] = engine.predict(lambda x: pooled_features(mae.encoder, x, p.model.pool), engine.to_device(d[f"x_{split}"][:limit], device),
                                      pt.batch_size, device)
        labels[split] = engine.to_device(d[f"y_{split}"][:limit], device).long()
    k = len(d["classes"])
    return {"knn_acc": represent.knn_accuracy(feats["train"], labels["train"], feats["val"], labels["val"], k,
                                              k=pt.knn_k),
            "probe_acc": represent.ridge_probe_accuracy(feats["train"], labels["train"], feats["val"],
                                                        labels["val"], k)}


@torch.no_grad()
def _reconstruction_figure(mae: MAE, images_u8, device, seed: int, cell: str, val_mse: float, path) -> None:
    mae.eval()
    x = engine.as_float(images_u8)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with engine.autocast(device):
        out = mae(x, generator=gen)
    p, c = mae.cfg.patch, mae.cfg.channels
    target, mask = out["target"], out["mask"].unsqueeze(-1)
    pixels = mae.to_pixels(out["pred"], target)
    masked = unpatchify(target * (1 - mask) + 0.5 * mask, p, c)
    # Visible patches as given, hidden ones as reconstructed: what the encoder saw plus what it inferred.
    recon = unpatchify(target * (1 - mask) + pixels * mask, p, c)
    report.reconstruction_figure(x.cpu().numpy(), masked.float().cpu().numpy(), recon.float().cpu().numpy(),
                                 f"MAE {cell}: val MSE on masked pixels {val_mse:.4f}", path)
