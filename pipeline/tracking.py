"""Everything MLflow: one run per stage invocation, with tags, params, per-epoch metrics, artifacts.

The store is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db` where root is
`DVC_ROOT` (set by DVC, also inside `dvc exp run --queue/--temp` copies) or the working directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import dist
from .errors import UserError
from .signals import held

# Fail fast instead of retrying a dead server for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(root: Path) -> str | None:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _check_reachable(uri: str) -> None:
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


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation: parallel first writers to a fresh SQLite store race on migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri[len("sqlite:///") :]).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class StageRun:
    """A live MLflow run. Use via `start(...)`; all calls go straight to the store.

    Without an MLflow module (the other processes under torchrun) every call does nothing."""

    def __init__(self, mlflow_module=None, run=None):
        self._mlflow, self.run = mlflow_module, run

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self._mlflow:
            with held():
                self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self._mlflow:
            with held():
                self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            with held():
                self._mlflow.log_artifact(str(path), artifact_path=folder)


@contextlib.contextmanager
def start(
    experiment: str, stage: str, params: dict[str, Any], dataset: str, cell: str | None = None
) -> Iterator[StageRun]:
    if not dist.is_main():
        yield StageRun()
        return
    uri = tracking_uri()
    _check_reachable(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri), held():
            if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
                # MLflow's default artifact root is ./mlruns under the *current* directory, which
                # inside `dvc exp run --queue` is a throwaway copy: pin it to the repo root.
                mlflow.create_experiment(experiment, artifact_location=(repo_root() / "mlruns").as_uri())
            mlflow.set_experiment(experiment)
    except Exception as e:  # noqa: BLE001 - any store failure is one line for the user
        raise UserError(
            f"mlflow: cannot use tracking store {uri} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    root = repo_root()
    tags = {"stage": stage, "dataset": dataset}
    if cell:
        tags["cell"] = cell
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    name = f"{stage}-{cell}" if cell else stage
    with held():
        run = mlflow.start_run(run_name=name, tags=tags)
        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
    try:
        yield StageRun(mlflow, run)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the run was stopped, it did not fail.
        with held():
            mlflow.end_run("KILLED")
        raise
    except BaseException:
        with held():
            mlflow.end_run("FAILED")
        raise
    with held():
        mlflow.end_run("FINISHED")
