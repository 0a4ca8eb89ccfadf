"""Everything MLflow: one run per stage invocation, with tags, params, per-epoch metrics, artifacts.

The store is `MLFLOW_TRACKING_URI` if set, else `sqlite:///<root>/mlflow.db` where root is
`DVC_ROOT` (set by DVC, also inside `dvc exp run --queue/--temp` copies) or the working directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import dist
from .errors import UserError
from .signals import held
from .store import repo_root, tracking_uri


def git_commit(root: Path) -> str | None:
    rev = os.environ.get("DVC_EXP_BASELINE_REV")
    if rev:
        return rev
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, str]:
    """Where a result came from: the git commit (the baseline under `dvc exp run`) and the DVC
    experiment's name when there is one."""
    out = {}
    commit = git_commit(repo_root())
    if commit:
        out["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        out["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return out


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

    @property
    def mlflow(self):
        """The mlflow module this run logs through; None where nothing is logged (torchrun ranks > 0)."""
        return self._mlflow

    def log_dataset(self, path: Path, name: str, context: str) -> None:
        """Record prepared file `path` as this run's input dataset; its digest is the file's MD5,
        the same hash DVC keeps for it in dvc.lock, so a run points at exact data."""
        if not self._mlflow:
            return
        import json

        from mlflow.data.dataset_source_registry import get_dataset_source_from_json
        from mlflow.data.meta_dataset import MetaDataset

        from .fsutil import md5

        # The source kind named, not guessed: resolving a bare path matches two kinds (and warns).
        source = get_dataset_source_from_json(json.dumps({"uri": str(Path(path).resolve())}), "local")
        dataset = MetaDataset(source, name=name, digest=md5(path))
        with held():
            self._mlflow.log_input(dataset, context=context)

    def summarise_parent(self, tags: dict[str, str], metrics: dict[str, float]) -> None:
        """Show `tags` and `metrics` on this invocation's parent run (the runs table's one row)."""
        parent = self.run.data.tags.get("mlflow.parentRunId") if self._mlflow else None
        if parent:
            client = self._mlflow.MlflowClient()
            with held():
                for k, v in tags.items():
                    client.set_tag(parent, k, v)
                for k, v in metrics.items():
                    client.log_metric(parent, k, float(v))

    def note_not_run(self, expected: dict[str, dict]) -> list[str]:
        """Stages of this invocation that DVC did not run (restored from its run cache, or unchanged)
        get a run under the parent anyway, tagged `dvc_not_run`, with the metrics of the outputs they
        left; `expected` maps run names to those metrics. A filter by experiment then misses none."""
        parent = self.run.data.tags.get("mlflow.parentRunId") if self._mlflow else None
        if not parent:
            return []
        client, exp_id = self._mlflow.MlflowClient(), self.run.info.experiment_id
        with held():
            children = self._mlflow.search_runs(
                [exp_id], f"tags.`mlflow.parentRunId` = '{parent}'", output_format="list"
            )
            grid = [r for r in children if r.data.tags.get(LEVEL) == "grid"]
            if grid:
                children += self._mlflow.search_runs(
                    [exp_id], f"tags.`mlflow.parentRunId` = '{grid[0].info.run_id}'", output_format="list"
                )
            ran = {r.info.run_name for r in children}
            missing = [name for name in expected if name not in ran]
            for name in missing:
                under = grid[0].info.run_id if grid and name.startswith("pretrain-") else parent
                tags = {k: v for k, v in self.run.data.tags.items() if k in ("dataset", "git_commit", "dvc_exp")}
                tags.update(
                    {
                        "stage": name.split("-")[0],
                        "mlflow.parentRunId": under,
                        "dvc_not_run": "outputs from an earlier run (DVC run cache or unchanged stage)",
                    }
                )
                run = client.create_run(exp_id, run_name=name, tags=tags)
                for k, v in expected[name].items():
                    client.log_metric(run.info.run_id, k, float(v))
                client.set_terminated(run.info.run_id, "FINISHED")
        return missing

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            with held():
                self._mlflow.log_artifact(str(path), artifact_path=folder)


# --- runs grouped per pipeline invocation --------------------------------------------------------
# Every `dvc repro` / `dvc exp run` gets one parent run (named by the DVC experiment where there is
# one); the grid cells sit under a `grid` run below it, every other stage directly below it. The
# stages of one invocation are separate processes, so they find their parent by the DVC process
# they run under (its pid and start time), recorded as the tag `maepipe.invocation`.
SYSTEM_METRICS_INTERVAL = 2  # seconds
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
LEVEL = "maepipe.level"  # "pipeline" or "grid" on the grouping runs; absent on stage runs
INVOCATION = "maepipe.invocation"


def invocation() -> str | None:
    """The nearest `dvc` ancestor process as `<pid>-<start time>`; None outside DVC (a stage run by hand)."""
    pid = os.getppid()
    for _ in range(8):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:2]):
            return f"{pid}-{fields[19]}"  # stat field 22: start time in clock ticks since boot
        pid = int(fields[1])
        if pid <= 1:
            return None
    return None


def _grouping_run(mlflow, experiment: str, level: str, key: str, name: str, tags: dict, parent: str | None) -> str:
    """The id of this invocation's `level` run, created on first use. The pipeline-level run carries
    the whole params file, flattened with the names the stages log, so comparing two invocations'
    parents shows which params differ beside what they bought."""
    exp = mlflow.get_experiment_by_name(experiment)
    found = mlflow.search_runs(
        [exp.experiment_id], f"tags.`{INVOCATION}` = '{key}' AND tags.`{LEVEL}` = '{level}'", output_format="list"
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run_tags = {
        INVOCATION: key,
        LEVEL: level,
        **{k: v for k, v in tags.items() if k in ("dataset", "git_commit", "dvc_exp")},
    }
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp.experiment_id, run_name=name, tags=run_tags)
    if level == "pipeline":
        from mlflow.entities import Param

        from .params import flatten, load

        flat = flatten(load("params.yaml"))
        client.log_batch(run.info.run_id, params=[Param(k, "null" if v is None else str(v)) for k, v in flat.items()])
    return run.info.run_id


def _parent_of(mlflow, experiment: str, stage: str, tags: dict) -> list[str]:
    """This invocation's grouping runs a stage run goes under: [pipeline] or [pipeline, grid]."""
    key = invocation()
    if key is None:
        return []
    name = tags.get("dvc_exp") or f"dvc repro {tags.get('git_commit', '')[:7]}".strip()
    top = _grouping_run(mlflow, experiment, "pipeline", key, name, tags, None)
    if stage != "pretrain":
        return [top]
    return [top, _grouping_run(mlflow, experiment, "grid", key, "grid", tags, top)]


def _span(mlflow, groups: list[str], status: str) -> None:
    """The grouping runs span the invocation: RUNNING while a stage runs, then ended at the last
    stage's end with its status; once FAILED (or KILLED) they stay so."""
    client = mlflow.MlflowClient()
    for run_id in groups:
        current = client.get_run(run_id).info.status
        if current in ("FAILED", "KILLED"):
            continue
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status)


VERBOSE = "MAEPIPE_VERBOSE"  # =1: MLflow's INFO lines and library warnings are shown again


def quiet_libraries() -> None:
    """A stage prints its own lines; MLflow's INFO lines (system metrics monitor, GPU probe) and its
    download bars are not the user's problem. MAEPIPE_VERBOSE=1 brings them back."""
    import logging

    if os.environ.get(VERBOSE) == "1":
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


@contextlib.contextmanager
def start(
    experiment: str, stage: str, params: dict[str, Any], dataset: str, cell: str | None = None
) -> Iterator[StageRun]:
    if not dist.is_main():
        yield StageRun()
        return
    uri = tracking_uri()  # reachable: the CLI checked it before the stage began (`__main__._preflight`)
    # Fail fast instead of retrying a dead server for minutes (read by MLflow's HTTP client).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    quiet_libraries()

    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri), held():
            if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
                # MLflow's default artifact root is ./mlruns under the *current* directory, which
                # inside `dvc exp run --queue` is a throwaway copy: pin it to the repo root.
                mlflow.create_experiment(experiment, artifact_location=(repo_root() / "mlruns").as_uri())
            exp = mlflow.set_experiment(experiment)
            if exp.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                # Without it MLflow 3's UI opens the experiment on its GenAI overview, not its runs.
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    except Exception as e:  # noqa: BLE001 - any store failure is one line for the user
        raise UserError(
            f"mlflow: cannot use tracking store {uri} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    tags = {"stage": stage, "dataset": dataset, **provenance()}
    if cell:
        tags["cell"] = cell
    if "git_commit" in tags:
        tags["mlflow.source.git.commit"] = tags["git_commit"]
    name = f"{stage}-{cell}" if cell else stage
    with _store_lock(uri), held():
        groups = _parent_of(mlflow, experiment, stage, tags)
        _span(mlflow, groups, "RUNNING")
    if groups:
        tags["mlflow.parentRunId"] = groups[-1]
    with held():
        # CPU, memory (and GPU) use every few seconds, beside the training curves.
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
        run = mlflow.start_run(run_name=name, tags=tags, log_system_metrics=True)
        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
    try:
        yield StageRun(mlflow, run)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the run was stopped, it did not fail.
        with held():
            mlflow.end_run("KILLED")
            _span(mlflow, groups, "KILLED")
        raise
    except BaseException:
        with held():
            mlflow.end_run("FAILED")
            _span(mlflow, groups, "FAILED")
        raise
    with held():
        mlflow.end_run("FINISHED")
        _span(mlflow, groups, "FINISHED")
