"""Device, optimizers (AdamW, LARS, SGD), warm-up + cosine schedule and the one training loop.

Data lives on the device as uint8; a batch is an index tensor into it. Per-step statistics are
accumulated on the device and read once per epoch, so the loop never waits on the host.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import dist
from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("params: device = 'cuda': no CUDA GPU is visible to PyTorch here; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("params: device = 'mps': Apple MPS is not available here; use auto or cpu")
    return torch.device(name)


def setup(device_name: str, seed: int) -> torch.device:
    """Seed everything and pick the device. CPU runs are bit-for-bit repeatable.

    Under torchrun this also joins the process group (NCCL on CUDA, gloo on the CPU) and gives
    each process its own GPU."""
    device = resolve_device(device_name)
    if dist.world_size() > 1:
        import torch.distributed as tdist

        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank())
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # Processes on one machine share its cores instead of each claiming all of them.
        torch.set_num_threads(max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device):
    """bf16 on CUDA; full fp32 elsewhere (CPU bf16 is slower and less exact on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distribute(module: nn.Module, device: torch.device) -> nn.Module:
    """Wrap `module` in DistributedDataParallel under torchrun; unchanged in a single process.

    Call the returned module in training steps so gradients are averaged across processes.
    Buffers (BatchNorm statistics) stay per process: validation calls differ in count per rank
    only if data did, and rank 0's copy is the one saved."""
    if dist.world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def teardown() -> None:
    if dist.world_size() > 1:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


# --- the fast-path switches --------------------------------------------------------------------

LR_REFERENCE_BATCH = 256


def scaled_lr(lr: float, batch_size: int) -> float:
    """Every lr in params.yaml is per 256 images: the optimiser steps at lr * batch / 256.

    The linear scaling rule (Goyal et al. 2017; MAE's `blr`): an update averages over `batch`
    images, so k times the batch takes k times fewer steps of k times the size and follows about
    the same trajectory. Warm-up is counted in epochs, so it lengthens in steps by itself."""
    return lr * batch_size / LR_REFERENCE_BATCH


def want_compile(setting, device: torch.device) -> bool:
    """`compile: auto` compiles on CUDA only: on the CPU inductor measured slower than eager for
    this model (README Performance), and its compile costs half a minute per stage there."""
    return setting is True or (setting == "auto" and device.type == "cuda")


class Compiled:
    """Calls `torch.compile(module)` until compiling fails, then the eager module for good.

    A failure can only be a compile failure in the first training step: the backward graph is
    lowered together with the forward one (PyTorch defers it to the first backward otherwise,
    when DDP's gradient hooks have already fired), so the whole compile happens in the first
    forward call, before the step has changed anything. `fit` catches it there, calls
    `fall_back` and redoes the step eagerly; from the first completed step on (`settled`) every
    error propagates as it is. Validation always calls `.eager`: its batches have other shapes
    and no gradients, each of which would cost another compile."""

    def __init__(self, module: nn.Module, enabled: bool, stage: str):
        self.eager, self.stage, self.active, self.settled = module, stage, enabled, False
        if enabled:
            import torch._functorch.config as functorch_config

            functorch_config.force_non_lazy_backward_lowering = True
        self.fn = torch.compile(module) if enabled else module

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def can_fall_back(self, error: BaseException) -> bool:
        from torch._dynamo.exc import TorchDynamoException

        return self.active and not self.settled and isinstance(error, TorchDynamoException)

    def fall_back(self, error: BaseException) -> None:
        import sys

        if dist.is_main():
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
            print(
                f"maepipe: note: {self.stage}: torch.compile failed ({reason}); training eagerly "
                f"(compile: false skips the attempt)",
                file=sys.stderr,
                flush=True,
            )
        self.fn, self.active = self.eager, False


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


# --- optimizers -------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as the MAE linear probe uses.

    Weight decay and the trust ratio apply to matrices only; 1-D parameters (biases) take the plain
    momentum step at the full rate, as facebookresearch/mae's LARS does. (An earlier version
    stepped them at lr * 0.001, which froze the biases of the probe's head.)"""

    def __init__(
        self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(
                        p_norm > 0, torch.where(u_norm > 0, group["trust_coefficient"] * p_norm / u_norm, one), one
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay, biases/norms/tokens do not."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("token") else decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def layer_decay_groups(encoder: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay for fine-tuning (BEiT, MAE): block i (0-based) of D steps at
    lr * layer_decay ** (D - i), the patch embedding and CLS token at lr * layer_decay ** (D + 1),
    the final norm at lr. Low layers hold the most general pretrained features and move least.
    `layer_decay: 1` is one lr for the whole encoder."""
    depth = len(encoder.blocks)

    def layer(name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1 if name.startswith("norm.") else 0

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith("token"))
        layer_id = layer(name)
        group = groups.setdefault(
            (layer_id, decay),
            {
                "params": [],
                "lr": lr * layer_decay ** (depth + 1 - layer_id),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(name: str, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    lr = groups[0]["lr"]
    if name == "adamw":
        kwargs = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kwargs)
    if name == "lars":
        return LARS(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise UserError(f"params: optimizer = {name!r}: must be one of adamw, lars, sgd")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up to each group's lr, then cosine to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- the loop ---------------------------------------------------------------------------------


class Diverged(UserError):
    pass


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean over the batch, differentiable
    correct: torch.Tensor | None = None  # number of correct predictions (classification)


def batch_indices(
    n: int, batch_size: int, device: torch.device, generator: torch.Generator, shuffle: bool = True
) -> list[torch.Tensor]:
    """Full batches of a fresh permutation; the ragged rest is dropped (a new draw every epoch,
    so no image is left out for good). Every step then has one shape: a compiled step compiles
    once, and a BatchNorm never normalises a handful of samples. Fewer images than a batch: one
    batch of all of them."""
    order = torch.randperm(n, device=device, generator=generator) if shuffle else torch.arange(n, device=device)
    full = n // batch_size
    if full == 0:
        return [order]
    return list(order[: full * batch_size].split(batch_size))


def _batch_stream(n: int, batch_size: int, device: torch.device, generator: torch.Generator):
    """Endless full batches cut from back-to-back permutations: no image repeats within a pass."""
    rest = torch.empty(0, dtype=torch.int64, device=device)
    while True:
        while len(rest) < batch_size:
            rest = torch.cat([rest, torch.randperm(n, device=device, generator=generator)])
        batch, rest = rest[:batch_size], rest[batch_size:]
        yield batch


PROGRESS_LOSS_EVERY = 10  # steps between loss readouts on the bar (each one is a host sync)


def _progress(stage: str, epoch: int, epochs: int, steps: int):
    """A tqdm bar over an epoch's steps, only for a person at a terminal: when stderr is not a TTY
    (DVC logs, CI, a queued experiment) or on ranks other than 0, None and no host syncs."""
    import sys

    if not dist.is_main() or not sys.stderr.isatty() or os.environ.get("MAEPIPE_PROGRESS") == "0":
        return None
    from tqdm import tqdm

    return tqdm(
        total=steps,
        desc=f"{stage} epoch {epoch}/{epochs}",
        leave=False,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def fit(
    *,
    stage: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    n_train: int,
    epochs: int,
    batch_size: int,
    warmup_epochs: float,
    device: torch.device,
    seed: int,
    step: Callable[[torch.Tensor], StepOutput],
    validate: Callable[[], dict[str, float]],
    on_epoch: Callable[[int, dict[str, float]], None],
    before_epoch: Callable[[int], None] | None = None,
    compiled: Compiled | None = None,
    steps_per_epoch: int | None = None,
) -> list[dict[str, float]]:
    """Train for `epochs`; after each, validate and hand the epoch's metrics to `on_epoch`.

    `steps_per_epoch`: an "epoch" is that many full batches drawn from back-to-back fresh
    permutations instead of one pass over the data. Classifiers train for a fixed number of steps
    whatever their label budget, so 10 labels per class are not starved and all of them are not
    over-trained; validation then runs every `steps_per_epoch` steps.

    `compiled`: the Compiled module `step` calls, if any; a step that fails while it is still
    compiling is redone eagerly after `fall_back`.

    Under torchrun every process draws the same global batches (same seed) and trains on its
    slice of each; `step` must call a `distribute`d module so gradients are averaged, which makes
    an update the same as one process's on the whole batch."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rank, world = dist.rank(), dist.world_size()
    if world > 1 and min(batch_size, n_train) % world:
        # Unequal slices would make DDP's average of per-process means differ from the mean
        # over the batch (and an empty slice would give a NaN loss).
        raise UserError(
            f"{stage}: batch size {min(batch_size, n_train)} is not a multiple of the {world} "
            f"torchrun processes; choose a batch_size (and a data size) divisible by {world}"
        )
    stream = None
    if steps_per_epoch is None:
        steps_per_epoch = len(batch_indices(n_train, batch_size, device, torch.Generator(device=device)))
    else:
        stream = _batch_stream(n_train, min(batch_size, n_train), device, generator)
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch)))
    history = []

    def forward_backward(idx):
        with autocast(device):
            out = step(idx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        return out

    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        if before_epoch is not None:
            before_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, has_acc = 0, False
        batches = (
            batch_indices(n_train, batch_size, device, generator)
            if stream is None
            else [next(stream) for _ in range(steps_per_epoch)]
        )
        bar = _progress(stage, epoch, epochs, len(batches))
        for i, idx in enumerate(batches):
            if world > 1:
                idx = idx[rank::world]
            try:
                out = forward_backward(idx)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is a first-step compile failure
                if compiled is None or not compiled.can_fall_back(error):
                    raise
                compiled.fall_back(error)
                out = forward_backward(idx)
            if compiled is not None:
                compiled.settled = True
            optimizer.step()
            scheduler.step()
            loss_sum += out.loss.detach().float() * len(idx)
            if out.correct is not None:
                correct += out.correct
                has_acc = True
            seen += len(idx)
            if bar is not None:
                bar.update()
                if i % PROGRESS_LOSS_EVERY == 0:
                    bar.set_postfix(loss=f"{out.loss.item():.4g}", refresh=False)
        if bar is not None:
            bar.close()
        if world > 1:
            import torch.distributed as tdist

            totals = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
            tdist.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise Diverged(
                f"{stage}: the training loss became {train_loss} in epoch {epoch}; "
                f"lower the learning rate or check the data"
            )
        metrics = {"train_loss": train_loss}
        if has_acc:
            metrics["train_acc"] = correct.item() / seen
        model.eval()
        # Validation in fp32 even on CUDA: these numbers choose cells and must not depend on bf16.
        with torch.no_grad():
            metrics.update(validate())
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise Diverged(
                f"{stage}: {bad[0]} became {metrics[bad[0]]} in epoch {epoch}; "
                f"lower the learning rate or check the data"
            )
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if dist.is_main():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "lr")
            where = (
                f"epoch {epoch}/{epochs}"
                if stream is None
                else f"step {epoch * steps_per_epoch}/{epochs * steps_per_epoch}"
            )
            print(f"{stage} {where}: {shown} ({time.perf_counter() - started:.1f}s)", flush=True)
        history.append(metrics)
        on_epoch(epoch, metrics)
    return history


@torch.no_grad()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images_u8: torch.Tensor,
    batch_size: int,
    device: torch.device,
    mixed_precision: bool = False,
) -> torch.Tensor:
    """Apply `fn` to float images batch by batch; returns the concatenated fp32 outputs.

    fp32 unless asked: test scores feed ROC curves, where bf16 rounding would create ties."""
    outs = []
    with autocast(device) if mixed_precision else contextlib.nullcontext():
        for chunk in images_u8.split(batch_size):
            outs.append(fn(as_float(chunk)).float())
    return torch.cat(outs)


def fit_classifier(
    *,
    stage: str,
    module: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    epochs: int,
    batch_size: int,
    warmup_epochs: float,
    device: torch.device,
    seed: int,
    on_epoch: Callable[[int, dict[str, float]], None],
    eval_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    compiled: Compiled | None = None,
    steps_per_epoch: int | None = None,
    label_smoothing: float = 0.0,
) -> list[dict[str, float]]:
    """Cross-entropy training of `forward` (inputs -> logits); `module` holds what is trained.

    `eval_forward` (default `forward`) scores the val split: the eager module when `forward`
    goes through a Compiled one (and the un-augmented one when `forward` augments).
    `label_smoothing` applies to the training loss only, so val_loss stays the plain one."""
    eval_forward = eval_forward or forward
    import torch.nn.functional as F

    def step(idx):
        logits = forward(x_train[idx]).float()
        target = y_train[idx]
        return StepOutput(
            F.cross_entropy(logits, target, label_smoothing=label_smoothing), (logits.argmax(1) == target).sum()
        )

    def validate():
        logits = torch.cat([eval_forward(chunk).float() for chunk in x_val.split(batch_size)])
        return {
            "val_loss": F.cross_entropy(logits, y_val).item(),
            "val_acc": (logits.argmax(1) == y_val).float().mean().item(),
        }

    return fit(
        stage=stage,
        model=module,
        optimizer=optimizer,
        n_train=len(x_train),
        epochs=epochs,
        batch_size=batch_size,
        warmup_epochs=warmup_epochs,
        device=device,
        seed=seed,
        step=step,
        validate=validate,
        on_epoch=on_epoch,
        compiled=compiled,
        steps_per_epoch=steps_per_epoch,
    )
