"""Named presets: overrides of params.yaml kept in `presets/<name>.yaml` as dotted keys.

`python -m pipeline preset seed` prints them as `-S key=value` arguments for `dvc exp run`, so a
preset is an ordinary DVC experiment whose params are recorded with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def load_preset(name: str | None) -> dict:
    available = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"preset {name!r}: unknown (available: {', '.join(available)})")
    return yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())


def hydra_value(value) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's): JSON is not it, because
    a dict key may not be quoted (`{epochs:10,augment:[crop]}`)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value) if isinstance(value, str) else json.dumps(value)


def dvc_set_args(name: str | None) -> list[str]:
    return [a for key, value in load_preset(name).items() for a in ("-S", f"{key}={hydra_value(value)}")]
