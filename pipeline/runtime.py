"""Where and how the code runs: the device (seeded, threads shared between processes), DDP under
torchrun, bf16 autocast on CUDA, torch.compile with its eager fallback, and the uint8 -> float
convention for images that live on the device."""

from __future__ import annotations

import contextlib
import os

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


def want_compile(setting, device: torch.device) -> bool:
    """`compile: auto` compiles on CUDA only: on the CPU inductor measured slower than eager for
    this model (README Performance), and its compile costs half a minute per stage there."""
    return setting is True or (setting == "auto" and device.type == "cuda")


class Compiled:
    """Calls `torch.compile(module)` until compiling fails, then the eager module for good.

    A compile failure can only happen in the first call: the backward graph is lowered together
    with the forward one (PyTorch defers it to the first backward otherwise, when DDP's gradient
    hooks have already fired), so the whole compile happens inside that call, before anything has
    changed. There it is caught, noted once, and the same call is made eagerly; from the first
    completed call on every error propagates as it is. Validation should call `.eager`: its
    batches have other shapes and no gradients, each of which would cost another compile."""

    def __init__(self, module: nn.Module, enabled: bool, stage: str):
        self.eager, self.stage, self.active, self.settled = module, stage, enabled, not enabled
        if enabled:
            import torch._functorch.config as functorch_config

            functorch_config.force_non_lazy_backward_lowering = True
        self.fn = torch.compile(module) if enabled else module

    def __call__(self, *args, **kwargs):
        if self.settled:
            return self.fn(*args, **kwargs)
        try:
            out = self.fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a compile failure
            if not self.can_fall_back(error):
                raise
            self._fall_back(error)
            out = self.fn(*args, **kwargs)
        self.settled = True
        return out

    def can_fall_back(self, error: BaseException) -> bool:
        from torch._dynamo.exc import TorchDynamoException

        return self.active and not self.settled and isinstance(error, TorchDynamoException)

    def _fall_back(self, error: BaseException) -> None:
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
