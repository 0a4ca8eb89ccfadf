"""Stage `pretrain_full`: the selected grid cell, pretrained on from its grid weights on every
unlabelled training image (`pretrain_full.*`), so the encoder that goes downstream gets the
pretraining budget while the grid only screens cells cheaply."""

from .. import checkpoint, data, optim, runtime, tracking
from ..params import Params, flatten
from . import ENCODER, IMAGES, METRICS, MODELS, PLOTS, PRETRAIN_DATA
from .pretrain import effective_mask_ratio, train_mae, write_outputs


def run(p: Params) -> None:
    device = runtime.setup(p.device, p.seed)
    best = checkpoint.load(MODELS / "best.pt")
    mae = checkpoint.build_mae(best).to(device)
    cell = best["meta"]["cell"]
    d = data.load_prepared(PRETRAIN_DATA)
    pf = p.pretrain_full
    x_train = runtime.to_device(d["x_train"][: pf.train_limit], device)
    x_val = runtime.to_device(d["x_val"][: p.pretrain.val_limit], device)
    params = {
        "seed": p.seed,
        "device": p.device,
        "compile": p.compile,
        "cell": cell,
        "loss": mae.loss_kind,
        **flatten(pf, "pretrain_full."),
        "pretrain_full.lr_scaled": optim.scaled_lr(pf.lr, pf.batch_size),
    }
    with tracking.start(p.mlflow.experiment, "pretrain_full", params, p.data.dataset, cell) as run:
        run.log_dataset(PRETRAIN_DATA, f"{p.data.dataset}-pretrain", "training")
        result = train_mae(p, mae, x_train, x_val, pf, f"pretrain_full {cell}", run, device)
        if result is None:
            return
        grid_steps = best["meta"]["metrics"].get("steps")
        metrics = {
            "cell": cell,
            "patch": mae.cfg.patch,
            "mask_ratio": mae.mask_ratio,
            "mask_ratio_effective": effective_mask_ratio(mae.cfg.num_patches, mae.mask_ratio),
            "grid_steps": grid_steps,
            "grid_val_mse": best["meta"]["metrics"].get("val_mse"),
            "train_images": len(x_train),
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
            model_path=ENCODER,
            metrics_path=METRICS / "pretrain_full.json",
            curve_path=PLOTS / "pretrain_full" / "curve.csv",
            recon_path=IMAGES / "recon_full.png",
            curve_figure=IMAGES / "pretrain_full_curve.png",
            phases=pf.phases,
            decoder=best["decoder"],
        )
