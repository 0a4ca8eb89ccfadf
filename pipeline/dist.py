"""Which process am I? Read from torchrun's environment, so it costs no import of torch.distributed.

Outside torchrun there is one process and it is the main one."""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Only the main process writes checkpoints, metrics, figures and MLflow runs."""
    return rank() == 0
