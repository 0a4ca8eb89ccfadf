"""`make bench`: maepipe's training loop against the usual one, same model, same data, one run.

The reference ("naive") loop is the way most tutorials train: a torchvision-style Dataset that
turns each uint8 image into a PIL image and through `ToTensor`, a DataLoader with batch 256, fp32
eager, `loss.item()` every step. maepipe's loop keeps the uint8 split on the device, indexes
batches there, runs bf16 autocast on CUDA and reads the loss once per epoch (loop.fit).

Throughput is steady state: each measurement follows a warm-up. Results go to stdout as a table
and to bench/results-<device>.json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from pipeline import cli, loop, optim, prepared, runtime
from pipeline import params as params_mod
from pipeline.errors import UserError
from pipeline.model import MAE, Classifier, Encoder
from pipeline.stages import PRETRAIN_DATA
from pipeline.stages.vit import vit_config

BATCH = 256
# Dense bf16 peak of the GPUs we know, for model FLOPs utilisation (MFU).
PEAK_BF16 = {
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
}


class PILDataset(Dataset):
    """What torchvision's MNIST-style datasets do per item: uint8 -> PIL -> ToTensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.to_tensor = transforms.ToTensor()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        img = self.images[i]
        pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        return self.to_tensor(pil), int(self.labels[i])


def _naive_throughput(loss_fn, optimizer, images, labels, device, steps: int, warmup: int = 2) -> float:
    """The usual loop around `loss_fn(x, y)`: DataLoader, fp32, `loss.item()` every step."""

    def step(x, y):
        loss = loss_fn(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    loader = DataLoader(PILDataset(images, labels), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=0)
    it = iter(loader)
    for _ in range(warmup):
        x, y = next(it)
        step(x.to(device), y.to(device)).item()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(it)
        step(x.to(device), y.to(device)).item()  # the per-step host sync of the usual loop
    _sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fit_throughput(run_epoch, n: int, device, repeats: int = 1) -> tuple[float, float]:
    """(images/s in steady state, seconds the warm-up epoch took beyond a steady one: the
    one-off cost of torch.compile, allocator and autotuning)."""
    with contextlib.redirect_stdout(io.StringIO()):  # loop.fit's per-epoch line
        start = time.perf_counter()
        run_epoch()  # warm-up: compile, allocator, kernels, autotuning
        _sync(device)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            run_epoch()
        _sync(device)
        steady = (time.perf_counter() - start) / repeats
    return n / steady, max(0.0, warm - steady)


def flops_per_image(model_step, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model_step(x)
    return counter.get_total_flops() / len(x)


def bench_pretrain(p, d, patch: int, mask: float, device, steps: int, compile_on: bool) -> dict:
    cfg = vit_config(p, patch, d)

    def make():
        torch.manual_seed(0)
        mae = MAE(cfg, mask, p.model.decoder_dim, p.model.decoder_depth, p.model.decoder_heads).to(device)
        return mae, torch.optim.AdamW(mae.parameters(), lr=1e-4)

    n = steps * BATCH
    images, labels = d["x_train"][: n + 4 * BATCH], d["y_train"][: n + 4 * BATCH]

    mae, opt = make()

    naive = _naive_throughput(lambda x, _y: mae(x)["loss"], opt, images, labels, device, steps)

    mae, _ = make()
    opt = optim.make_optimizer("adamw", optim.param_groups(mae, 1e-4, 0.05), device)
    x_dev = runtime.to_device(images[:n], device)
    net = runtime.Compiled(mae, compile_on, "bench")

    def epoch():
        loop.fit(
            stage="bench",
            model=mae,
            optimizer=opt,
            n_train=n,
            epochs=1,
            batch_size=BATCH,
            warmup_epochs=0,
            device=device,
            seed=0,
            step=lambda idx, epoch: loop.StepOutput(net(runtime.as_float(x_dev[idx]))["loss"]),
            validate=dict,
            on_epoch=lambda e, m: None,
        )

    fast, warmup_s = _fit_throughput(epoch, n, device)
    flops = flops_per_image(lambda x: mae(x)["loss"].backward(), runtime.as_float(x_dev[:8]))
    return {"fast": fast, "naive": naive, "flops_per_image": flops, "warmup_s": warmup_s, "compiled": net.active}


def bench_classifier(p, d, patch: int, device, steps: int, frozen: bool, compile_on: bool) -> dict:
    """Fine-tune (frozen=False) or probe (frozen=True) throughput at `patch`."""
    cfg = vit_config(p, patch, d)
    classes = len(d["classes"])

    def make():
        torch.manual_seed(0)
        clf = Classifier(Encoder(cfg), classes, pool=p.model.pool).to(device)
        if frozen:
            clf.encoder.requires_grad_(False).eval()
        trainable = clf.head if frozen else clf
        return clf, trainable

    n = steps * BATCH
    images, labels = d["x_train"][: n + 4 * BATCH], d["y_train"][: n + 4 * BATCH]
    clf, trainable = make()
    opt = torch.optim.AdamW(trainable.parameters(), lr=1e-4)

    def naive_loss(x, y):
        if frozen:
            with torch.no_grad():
                feats = clf.features(x)
            return F.cross_entropy(clf.head(feats), y)
        return F.cross_entropy(clf(x), y)

    naive = _naive_throughput(naive_loss, opt, images, labels, device, steps)

    clf, trainable = make()
    opt = optim.make_optimizer("adamw", optim.param_groups(trainable, 1e-4, 0.0), device)
    x_dev, y_dev = runtime.to_device(images[:n], device), runtime.to_device(labels[:n], device)
    net = None
    if frozen:
        # maepipe's probe: features once, then the head trains on them (see stages/probe.py).
        module, forward, eval_forward = clf.head, clf.head, None

        def inputs():
            return loop.predict(clf.features, x_dev, BATCH, device, mixed_precision=True)
    else:
        net = runtime.Compiled(clf, compile_on, "bench")
        module, forward = clf, lambda u8: net(runtime.as_float(u8))
        eval_forward = lambda u8: clf(runtime.as_float(u8))  # noqa: E731

        def inputs():
            return x_dev

    def epoch():
        x = inputs()
        loop.fit_classifier(
            stage="bench",
            module=module,
            forward=forward,
            eval_forward=eval_forward,
            optimizer=opt,
            x_train=x,
            y_train=y_dev,
            x_val=x[:BATCH],
            y_val=y_dev[:BATCH],
            epochs=1,
            batch_size=BATCH,
            warmup_epochs=0,
            device=device,
            seed=0,
            on_epoch=lambda e, m: None,
        )

    fast, warmup_s = _fit_throughput(epoch, n, device)
    return {"fast": fast, "naive": naive, "warmup_s": warmup_s, "compiled": bool(net and net.active)}


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=None, help="timed batches per row (default: 8 CPU, 50 CUDA)")
    ap.add_argument("--patches", default="2,4,7,14")
    ap.add_argument("--out", default="bench")
    ap.add_argument(
        "--compile",
        choices=("auto", "true", "false"),
        default=None,
        help="torch.compile maepipe's step (default: params.yaml's `compile`; auto = CUDA only)",
    )
    args = ap.parse_args(argv)
    return cli.guarded(lambda: _bench(args))


def _bench(args) -> int:
    p = params_mod.load(args.params)
    device = runtime.setup(p.device, p.seed)
    d = prepared.load_prepared(PRETRAIN_DATA)
    patches = [int(x) for x in args.patches.split(",")]
    for patch in patches:
        params_mod.check_cell(p, patch, 0.5, what="bench")
    steps = args.steps or (50 if device.type == "cuda" else 8)
    if len(d["x_train"]) < (steps + 4) * BATCH:
        raise UserError(
            f"bench needs {(steps + 4) * BATCH} training images, {PRETRAIN_DATA} has {len(d['x_train'])}; lower --steps"
        )
    setting = p.compile if args.compile is None else {"true": True, "false": False}.get(args.compile, "auto")
    compile_on = runtime.want_compile(setting, device)
    name = device_name(device)
    peak = peak_flops(name) if device.type == "cuda" else None
    rows = []
    for patch in patches:
        r = bench_pretrain(p, d, patch, 0.5, device, steps, compile_on)
        achieved = r["fast"] * r["flops_per_image"]
        rows.append(_row(f"MAE pretrain p{patch}-m0.5", r, r["flops_per_image"] / 1e9, achieved, peak))
        print(_fmt_row(rows[-1]), flush=True)
    ft_patch = p.patch if p.patch != "auto" else patches[-1]
    for what, frozen in (("probe", True), ("finetune", False)):
        r = bench_classifier(p, d, ft_patch, device, steps, frozen, compile_on)
        rows.append(_row(f"{what} epoch p{ft_patch}", r, None, None, None))
        print(_fmt_row(rows[-1]), flush=True)
    out = _write(p, args.out, device, name, compile_on, steps, peak, rows)
    precision = _precision(device)
    print(
        f"\n{name} ({device.type}), torch {torch.__version__}, {precision}, "
        f"torch.compile {'on' if compile_on else 'off'}, {torch.get_num_threads()} threads"
        f" -> {out}"
    )
    return 0


def _precision(device) -> str:
    return "bf16 autocast (maepipe) / fp32 (naive)" if device.type == "cuda" else "fp32"


def _row(what: str, r: dict, gflop: float | None, achieved: float | None, peak: float | None) -> dict:
    return {
        "what": what,
        "naive_img_s": r["naive"],
        "maepipe_img_s": r["fast"],
        "ratio": r["fast"] / r["naive"],
        "gflop_per_img": gflop,
        "achieved_tflop_s": achieved / 1e12 if achieved is not None else None,
        "mfu": achieved / peak if peak and achieved is not None else None,
        "compiled": r["compiled"],
        "warmup_s": r["warmup_s"],
    }


def _write(p, out_dir: str, device, name: str, compile_on: bool, steps: int, peak, rows: list[dict]) -> Path:
    result = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "precision": _precision(device),
        "compile": compile_on,
        "threads": torch.get_num_threads(),
        "batch_size": BATCH,
        "timed_batches": steps,
        "dataset": p.data.dataset,
        "model": {
            "dim": p.model.dim,
            "depth": p.model.depth,
            "heads": p.model.heads,
            "decoder_dim": p.model.decoder_dim,
            "decoder_depth": p.model.decoder_depth,
        },
        "peak_bf16_flop_s": peak,
        "rows": rows,
    }
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if compile_on != runtime.want_compile("auto", device):
        slug += "-compile" if compile_on else "-eager"
    out = Path(out_dir) / f"results-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def _fmt_row(r: dict) -> str:
    extra = f"  {r['gflop_per_img'] * 1e3:7.2f} MFLOP/img" if r["gflop_per_img"] else ""
    if r["mfu"] is not None:
        extra += f"  MFU {100 * r['mfu']:.1f}%"
    if r["compiled"]:
        extra += f"  compile {r['warmup_s']:.0f}s"
    return (
        f"{r['what']:<26} naive {r['naive_img_s']:9.0f} img/s   maepipe {r['maepipe_img_s']:9.0f} img/s"
        f"   x{r['ratio']:.2f}{extra}"
    )


if __name__ == "__main__":
    sys.exit(main())
