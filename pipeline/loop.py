"""The one training loop (pretrain, probe, fine-tune) and batched prediction.

Data lives on the device as uint8; a batch is an index tensor into it. Per-step statistics are
accumulated on the device and read once per epoch, so the loop never waits on the host.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import dist
from .errors import UserError
from .optim import warmup_cosine
from .runtime import as_float, autocast

if TYPE_CHECKING:
    from .resume import Resume


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


class BatchStream:
    """Endless full batches cut from back-to-back permutations: no image repeats within a pass.
    Its state (what is left of the current permutation) is saved with a resume checkpoint."""

    def __init__(self, n: int, batch_size: int, device: torch.device, generator: torch.Generator):
        self.n, self.batch_size, self.device, self.generator = n, batch_size, device, generator
        self.rest = torch.empty(0, dtype=torch.int64, device=device)

    def __next__(self) -> torch.Tensor:
        while len(self.rest) < self.batch_size:
            self.rest = torch.cat([self.rest, torch.randperm(self.n, device=self.device, generator=self.generator)])
        batch, self.rest = self.rest[: self.batch_size], self.rest[self.batch_size :]
        return batch


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
    step: Callable[[torch.Tensor, int], StepOutput],
    validate: Callable[[], dict[str, float]],
    on_epoch: Callable[[int, dict[str, float]], None],
    steps_per_epoch: int | None = None,
    resume: Resume | None = None,
    generators: Sequence[torch.Generator] = (),
) -> list[dict[str, float]]:
    """Train for `epochs`; after each, validate and hand the epoch's metrics to `on_epoch`.

    `steps_per_epoch`: an "epoch" is that many full batches drawn from back-to-back fresh
    permutations instead of one pass over the data. Classifiers train for a fixed number of steps
    whatever their label budget, so 10 labels per class are not starved and all of them are not
    over-trained; validation then runs every `steps_per_epoch` steps.

    Under torchrun every process draws the same global batches (same seed) and trains on its
    slice of each; `step` must call a `distribute`d module so gradients are averaged, which makes
    an update the same as one process's on the whole batch.

    `resume`: after every epoch the model, optimiser, schedule, batch order and every random state
    (the global one and `generators`, e.g. the augmentation's) are saved there; a run that finds a
    state continues after its last epoch (replaying the earlier epochs to `on_epoch`, so curves and
    MLflow get the whole history) and ends with the same bytes as an uninterrupted run."""
    generator = torch.Generator(device=device).manual_seed(seed)
    world = dist.world_size()
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
        stream = BatchStream(n_train, min(batch_size, n_train), device, generator)
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, int(round(warmup_epochs * steps_per_epoch)))
    where = (
        (lambda e: f"epoch {e}/{epochs}")
        if stream is None
        else (lambda e: f"step {e * steps_per_epoch}/{epochs * steps_per_epoch}")
    )
    parts = (model, optimizer, scheduler, stream, [generator, *generators])
    history = _resumed(resume, parts, stage, where, on_epoch)
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        batches = (
            batch_indices(n_train, batch_size, device, generator)
            if stream is None
            else [next(stream) for _ in range(steps_per_epoch)]
        )
        model.train()
        metrics = _train_epoch(stage, epoch, epochs, batches, step, optimizer, scheduler, device)
        model.eval()
        # Validation in fp32 even on CUDA: these numbers choose cells and must not depend on bf16.
        with torch.no_grad():
            metrics.update(validate())
        _check_finite(stage, epoch, metrics)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        history.append(metrics)
        if resume is not None:  # before the epoch's line: a line seen means a state saved
            resume.save(_state(parts, history))
        if dist.is_main():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "lr")
            print(f"{stage} {where(epoch)}: {shown} ({time.perf_counter() - started:.1f}s)", flush=True)
        on_epoch(epoch, metrics)
    return history


def _state(parts, history: list[dict]) -> dict:
    model, optimizer, scheduler, stream, generators = parts
    from .resume import rng_state

    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stream": None if stream is None else stream.rest.cpu(),
        "rng": rng_state(generators),
        "history": history,
    }


def _resumed(resume: Resume | None, parts, stage: str, where, on_epoch) -> list[dict]:
    """The epochs a saved state already holds (restored into `parts`, replayed to `on_epoch`)."""
    state = resume.load() if resume is not None else None
    if state is None:
        return []
    model, optimizer, scheduler, stream, generators = parts
    from .resume import set_rng_state

    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if stream is not None:
        stream.rest = state["stream"].to(stream.device)
    set_rng_state(state["rng"], generators)
    history = state["history"]
    print(f"{stage}: resuming after {where(len(history))} (saved in {resume.path})", flush=True)
    for epoch, metrics in enumerate(history, 1):
        on_epoch(epoch, metrics)
    return history


def _train_epoch(stage, epoch, epochs, batches, step, optimizer, scheduler, device) -> dict[str, float]:
    """One pass over `batches`: the mean training loss (and accuracy when `step` counts correct
    predictions), summed on the device and read once at the end, over every process."""
    rank, world = dist.rank(), dist.world_size()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen, has_acc = 0, False
    bar = _progress(stage, epoch, epochs, len(batches))
    for i, idx in enumerate(batches):
        if world > 1:
            idx = idx[rank::world]
        with autocast(device):
            out = step(idx, epoch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
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
    metrics = {"train_loss": loss_sum.item() / seen}
    _check_finite(stage, epoch, metrics)
    if has_acc:
        metrics["train_acc"] = correct.item() / seen
    return metrics


def _check_finite(stage: str, epoch: int, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad == ["train_loss"]:
        raise Diverged(
            f"{stage}: the training loss became {metrics['train_loss']} in epoch {epoch}; "
            f"lower the learning rate or check the data"
        )
    if bad:
        raise Diverged(
            f"{stage}: {bad[0]} became {metrics[bad[0]]} in epoch {epoch}; lower the learning rate or check the data"
        )


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
    steps_per_epoch: int | None = None,
    label_smoothing: float = 0.0,
    resume: Resume | None = None,
    generators: Sequence[torch.Generator] = (),
) -> list[dict[str, float]]:
    """Cross-entropy training of `forward` (inputs -> logits); `module` holds what is trained.

    `eval_forward` (default `forward`) scores the val split: the eager module when `forward`
    goes through a Compiled one (and the un-augmented one when `forward` augments).
    `label_smoothing` applies to the training loss only, so val_loss stays the plain one."""
    eval_forward = eval_forward or forward
    import torch.nn.functional as F

    def step(idx, epoch):
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
        steps_per_epoch=steps_per_epoch,
        resume=resume,
        generators=generators,
    )
