"""Resume checkpoints: a long training stage that is killed (OOM, pre-emption, Ctrl-C) continues
from its last completed epoch when it runs again with the same params, inputs and code, and ends
with the same bytes as an uninterrupted run on the same machine.

A stage's resume state lives outside DVC's outputs, in `<repo>/.maepipe/resume/` (DVC removes a
stage's outputs before it runs it, and the queue's temporary copies vanish), one file per training
run, named by what it trains and a fingerprint of everything it depends on: every params value, its
input files' bytes and the `pipeline` package's code. A changed fingerprint is another run, so a
changed param discards the old state (the stage deletes it). The stage deletes its states once its
outputs are written. Single process only: under torchrun every rank would need its own RNG state.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import dist
from .fsutil import atomic_path, md5

PACKAGE = Path(__file__).resolve().parent


def root() -> Path:
    from .store import repo_root

    return repo_root() / ".maepipe" / "resume"


def fingerprint(params: dict, inputs: list[Path], extra: str = "") -> str:
    """What a training run depends on: params, input files' bytes, the package's code."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in inputs:
        h.update(md5(path).encode())
    for source in sorted(PACKAGE.rglob("*.py")):
        h.update(source.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


class Resume:
    """The resume state of one training run (`name`, e.g. `finetune-r1`) under `fingerprint`."""

    def __init__(self, name: str, fingerprint: str):
        self.name, self.fingerprint = name, fingerprint
        self.path = root() / f"{name}-{fingerprint}.pt"

    @classmethod
    def maybe(cls, name: str, fingerprint: str) -> Resume | None:
        """None under torchrun (see the module's docstring)."""
        return cls(name, fingerprint) if dist.world_size() == 1 else None

    def load(self) -> dict | None:
        # Another fingerprint's state is another run's: a changed param discards it.
        for old in self.path.parent.glob(f"{self.name}-*.pt"):
            if old != self.path:
                old.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a state cut short by the kill: start over
            self.path.unlink(missing_ok=True)
            return None

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def rng_state(generators) -> dict:
    state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators) -> None:
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
