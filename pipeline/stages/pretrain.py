"""Stage `pretrain@<patch>-<mask>`: one MAE for one grid cell."""

import time

import torch

from .. import checkpoint, dist, figures, loop, optim, prepared, report, runtime, tracking
from ..augment import augment
from ..errors import UserError
from ..model import MAE, masked_pixel_sse, num_visible, unpatchify
from ..params import Params, cell_name, check_cell, flatten
from ..resume import Resume, fingerprint
from . import IMAGES, METRICS, PLOTS, PRETRAIN_DATA, mae_path
from .vit import vit_config

FIGURE_IMAGES = 8


def run(p: Params, patch: int, mask_ratio: float) -> None:
    if patch not in p.grid.patch or mask_ratio not in p.grid.mask_ratio:
        raise UserError(
            f"pretrain: cell patch={patch} mask_ratio={mask_ratio:g} is not in the grid "
            f"(grid.patch {list(p.grid.patch)}, grid.mask_ratio {list(p.grid.mask_ratio)})"
        )
    check_cell(p, patch, mask_ratio)
    cell = cell_name(patch, mask_ratio)
    device = runtime.setup(p.device, p.seed)
    d = prepared.load_prepared(PRETRAIN_DATA)
    # The train split is already shuffled with the seed, so a prefix is a random subset.
    x_train = runtime.to_device(d["x_train"][: p.pretrain.train_limit], device)
    x_val = runtime.to_device(d["x_val"][: p.pretrain.val_limit], device)
    cfg = vit_config(p, patch, d)
    pt = p.pretrain
    decoder = decoder_params(p)
    mae = MAE(cfg, mask_ratio, loss=pt.loss, **decoder).to(device)
    params = {
        "seed": p.seed,
        "device": p.device,
        "compile": p.compile,
        "patch": patch,
        "mask_ratio": mask_ratio,
        "mask_ratio_effective": effective_mask_ratio(cfg.num_patches, mask_ratio),
        **flatten(p.data, "data."),
        **flatten(p.model, "model."),
        **flatten(pt, "pretrain."),
        "pretrain.lr_scaled": optim.scaled_lr(pt.lr, pt.batch_size),
    }
    resume = Resume.maybe(f"pretrain-{cell}", fingerprint(flatten(p), [PRETRAIN_DATA], cell))
    with tracking.start(p.mlflow.experiment, "pretrain", params, p.data.dataset, cell) as run:
        run.log_dataset(PRETRAIN_DATA, f"{p.data.dataset}-pretrain", "training")
        result = train_mae(p, mae, x_train, x_val, pt, f"pretrain {cell}", run, device, p.seed, resume)
        if result is None:
            return
        metrics = {
            "patch": patch,
            "mask_ratio": mask_ratio,
            "mask_ratio_effective": params["mask_ratio_effective"],
            **result["final"],
        }
        write_outputs(
            mae,
            result,
            metrics,
            x_val,
            p,
            cell,
            run,
            device,
            model_path=mae_path(cell),
            metrics_path=METRICS / "pretrain" / f"{cell}.json",
            curve_path=PLOTS / "pretrain" / f"{cell}.csv",
            recon_path=IMAGES / "recon" / f"{cell}.png",
            curve_figure=IMAGES / "pretrain_curve" / f"{cell}.png",
            phases=pt.phases,
            decoder=decoder,
            title=cell,
        )
    if resume is not None:
        resume.clear()


def decoder_params(p: Params) -> dict:
    m = p.model
    return {"decoder_dim": m.decoder_dim, "decoder_depth": m.decoder_depth, "decoder_heads": m.decoder_heads}


def effective_mask_ratio(num_patches: int, mask_ratio: float) -> float:
    """The fraction really hidden: floor(L * ratio) / L (with 4 patches, 0.5 and 0.7 both hide 2)."""
    return (num_patches - num_visible(num_patches, mask_ratio)) / num_patches


def train_mae(
    p: Params, mae: MAE, x_train, x_val, schedule, stage: str, run, device, seed: int, resume=None
) -> dict | None:
    """Train `mae` on `x_train` (uint8 on the device) under `schedule` (phases, batch size, lr,
    weight decay, warm-up), its batch order and augmentation drawn from `seed`, logging each epoch
    to `run`. Validation uses the same masks (from `p.seed`) for every run, so val curves of
    different runs compare. `resume` (a `resume.Resume`) continues a killed run. Returns the final
    numbers and the curve on the main process, None elsewhere (under torchrun only rank 0
    writes)."""
    lr = optim.scaled_lr(schedule.lr, schedule.batch_size)
    optimizer = optim.make_optimizer("adamw", optim.param_groups(mae, lr, schedule.weight_decay), device)
    net = runtime.Compiled(runtime.distribute(mae, device), runtime.want_compile(p.compile, device), stage)
    phase_of = schedule.phase_of()
    aug_gen = torch.Generator(device=device).manual_seed(seed + 2)
    ops_of_epoch = [schedule.phases[phase - 1].augment for phase in phase_of]

    def step(idx, epoch):
        return loop.StepOutput(net(augment(runtime.as_float(x_train[idx]), ops_of_epoch[epoch - 1], aug_gen))["loss"])

    def validate():
        # The same masks every epoch and for every run: the curve moves only because the model does.
        gen = torch.Generator(device=device).manual_seed(p.seed + 1)
        loss_sum = torch.zeros((), device=device)
        sse = torch.zeros((), device=device)
        pixels = torch.zeros((), device=device)
        for chunk in x_val.split(schedule.batch_size):
            out = mae(runtime.as_float(chunk), generator=gen)
            loss_sum += out["loss"].float() * len(chunk)
            s, n = masked_pixel_sse(mae.to_pixels(out["pred"], out["target"]), out["target"], out["mask"])
            sse += s
            pixels += n
        result = {"val_loss": loss_sum.item() / len(x_val)}
        # A norm_pix model predicts a hidden patch only up to that patch's own mean and std: turning
        # it into pixels needs the answer's statistics, so its pixel MSE is not reported at all.
        if mae.loss_kind != "norm_pix":
            result["val_mse"] = (sse / pixels).item()
        return result

    curve = []

    def on_epoch(epoch, metrics):
        phase = phase_of[epoch - 1]
        curve.append(
            {"epoch": epoch, "phase": phase, **{k: metrics.get(k) for k in ("train_loss", "val_loss", "val_mse")}}
        )
        run.log_epoch(epoch, {**metrics, "phase": phase})

    start = time.perf_counter()
    history = loop.fit(
        stage=stage,
        model=mae,
        optimizer=optimizer,
        n_train=len(x_train),
        epochs=schedule.epochs,
        batch_size=schedule.batch_size,
        warmup_epochs=schedule.warmup_epochs,
        device=device,
        seed=seed,
        step=step,
        validate=validate,
        on_epoch=on_epoch,
        resume=resume,
        generators=[aug_gen],
    )
    seconds = time.perf_counter() - start
    if not dist.is_main():
        return None
    steps = schedule.epochs * (len(x_train) // schedule.batch_size or 1)
    run.log_metrics({"images_per_s": schedule.epochs * len(x_train) / seconds, "seconds": seconds, "steps": steps})
    final = {k: history[-1].get(k) for k in ("train_loss", "val_loss", "val_mse")}
    return {"final": {**final, "steps": steps}, "curve": curve}


def write_outputs(
    mae: MAE,
    result: dict,
    metrics: dict,
    x_val,
    p: Params,
    name: str,
    run,
    device,
    *,
    model_path,
    metrics_path,
    curve_path,
    recon_path,
    curve_figure,
    phases,
    decoder,
    title,
) -> None:
    """The files every MAE training leaves: checkpoint, metrics, curve, reconstructions, curve figure."""
    score = (
        f"val MSE on masked pixels {metrics['val_mse']:.4f}"
        if metrics.get("val_mse") is not None
        else f"val loss {metrics['val_loss']:.4f}"
    )
    _reconstruction_figure(mae, x_val[:FIGURE_IMAGES], device, p.seed, f"MAE {title}: {score}", recon_path)
    checkpoint.save(model_path, checkpoint.mae_payload(mae, decoder=decoder, cell=name, metrics=metrics))
    report.write_json(metrics, metrics_path)
    report.write_csv(result["curve"], curve_path)
    figures.pretrain_curve_figure(
        result["curve"], [ph.describe() for ph in phases], f"MAE {title}: loss per epoch", curve_figure
    )
    for path in (recon_path, curve_figure, curve_path):
        run.log_artifact(path)


@torch.no_grad()
def _reconstruction_figure(mae: MAE, images_u8, device, seed: int, title: str, path) -> None:
    mae.eval()
    x = runtime.as_float(images_u8)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with runtime.autocast(device):
        out = mae(x, generator=gen)
    p, c = mae.cfg.patch, mae.cfg.channels
    target, mask = out["target"], out["mask"].unsqueeze(-1)
    pixels = mae.to_pixels(out["pred"], target)
    masked = unpatchify(target * (1 - mask) + 0.5 * mask, p, c)
    # Visible patches as given, hidden ones as reconstructed: what the encoder saw plus what it inferred.
    recon = unpatchify(target * (1 - mask) + pixels * mask, p, c)
    figures.reconstruction_figure(
        x.cpu().numpy(), masked.float().cpu().numpy(), recon.float().cpu().numpy(), title, path
    )
