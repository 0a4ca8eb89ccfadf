"""Stage `pretrain_full@k`: repetition k's pretraining run. A fresh MAE of the cell repetition k
selected, trained from its own seed on every unlabelled training image (`pretrain_full.*`), so the
encoder each repetition takes downstream is an independent pretraining run and its noise enters
the intervals `evaluate` reports; the grid only screens cells cheaply."""

from .. import optim, prepared, repetition, runtime, tracking
from ..model import MAE
from ..params import Params, flatten
from ..resume import Resume, fingerprint
from . import IMAGES, METRICS, PLOTS, PRETRAIN_DATA, encoder_path, selected, selection_path
from .pretrain import decoder_params, effective_mask_ratio, train_mae, write_outputs
from .vit import vit_config


def run(p: Params, k: int) -> None:
    cell = selected(k)
    seed = repetition.seed_of(p.seed, k)
    device = runtime.setup(p.device, seed)
    d = prepared.load_prepared(PRETRAIN_DATA)
    pf = p.pretrain_full
    x_train = runtime.to_device(d["x_train"][: pf.train_limit], device)
    x_val = runtime.to_device(d["x_val"][: p.pretrain.val_limit], device)
    decoder = decoder_params(p)
    mae = MAE(vit_config(p, cell["patch"], d), cell["mask_ratio"], loss=p.pretrain.loss, **decoder).to(device)
    name = f"r{k}-{cell['cell']}"
    params = {
        "seed": p.seed,
        "repetition": k,
        "repetition_seed": seed,
        "device": p.device,
        "compile": p.compile,
        "cell": cell["cell"],
        "loss": mae.loss_kind,
        **flatten(p.model, "model."),
        **flatten(pf, "pretrain_full."),
        "pretrain_full.lr_scaled": optim.scaled_lr(pf.lr, pf.batch_size),
    }
    resume = Resume.maybe(f"pretrain_full-r{k}", fingerprint(flatten(p), [PRETRAIN_DATA, selection_path(k)], name))
    with tracking.start(p.mlflow.experiment, "pretrain_full", params, p.data.dataset, name) as run:
        run.log_dataset(PRETRAIN_DATA, f"{p.data.dataset}-pretrain", "training")
        result = train_mae(p, mae, x_train, x_val, pf, f"pretrain_full {name}", run, device, seed, resume)
        if result is None:
            return
        metrics = {
            "repetition": k,
            "cell": cell["cell"],
            "patch": mae.cfg.patch,
            "mask_ratio": mae.mask_ratio,
            "mask_ratio_effective": effective_mask_ratio(mae.cfg.num_patches, mae.mask_ratio),
            "train_images": len(x_train),
            **result["final"],
        }
        write_outputs(
            mae,
            result,
            metrics,
            x_val,
            p,
            cell["cell"],
            run,
            device,
            model_path=encoder_path(k),
            metrics_path=METRICS / "pretrain_full" / f"r{k}.json",
            curve_path=PLOTS / "pretrain_full" / f"r{k}.csv",
            recon_path=IMAGES / "pretrain_full" / f"r{k}-recon.png",
            curve_figure=IMAGES / "pretrain_full" / f"r{k}-curve.png",
            phases=pf.phases,
            decoder=decoder,
            title=f"{cell['cell']}, repetition {k}",
        )
    if resume is not None:
        resume.clear()
