"""Where the MLflow store is, and whether it answers: `MLFLOW_TRACKING_URI` if set, else
`sqlite:///<root>/mlflow.db` where root is `DVC_ROOT` (set by DVC, also inside `dvc exp run
--queue/--temp` copies) or the working directory. No MLflow import: every stage checks this before
it starts."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer is one clear error (a local store always does)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"mlflow: tracking server MLFLOW_TRACKING_URI = {uri} cannot be reached "
            f"({reason}); start it or unset MLFLOW_TRACKING_URI to use the local store"
        ) from None
