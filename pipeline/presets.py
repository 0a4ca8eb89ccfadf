"""Named presets: overrides of params.yaml kept in `presets/<name>.yaml` as dotted keys.

`python -m pipeline preset seed` prints them as `-S key=value` arguments for `dvc exp run`, so a
preset is an ordinary DVC experiment whose params are recorded with it."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def load_preset(name: str | None) -> dict:
    available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"preset {name!r}: unknown (available: {', '.join(available)})")
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())


def dvc_set_args(name: str | None) -> list[str]:
    args = []
    for key, value in load_preset(name).items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        args += ["-S", f"{key}={text}"]
    return args
