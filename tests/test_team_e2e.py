"""Working in a team, for real: parallel queued experiments creating a fresh SQLite store and logging
to the repo root's, and stages that are stopped (SIGTERM / Ctrl-C) end cleanly with their MLflow
run marked KILLED."""

import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, env, mlflow_runs, sh, tiny_params, write_params


def test_two_queued_experiments_run_in_parallel_on_a_fresh_store(repro_copy):
    """Two queued experiments run at once (`-j 2`) in DVC's temporary copies of a repo whose MLflow
    store was deleted: both workers create the store at once (MLflow's schema migration is not safe
    against that, so maepipe creates it under a file lock), and both log to the repo root's store
    (DVC_ROOT), not to their throwaway copies."""
    import shutil

    repo = repro_copy
    (repo / "mlflow.db").unlink()
    shutil.rmtree(repo / "mlruns", ignore_errors=True)
    sh(["dvc", "exp", "run", "--queue", "-n", "ft1", "-S", "finetune.min_steps=10"], repo)
    sh(["dvc", "exp", "run", "--queue", "-n", "ft3", "-S", "finetune.min_steps=30"], repo)
    sh(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo).stdout
        done = [line for line in status.splitlines() if ("Success" in line or "Failed" in line)]
        if len(done) == 2:
            break
        time.sleep(3)
    logs = {name: sh(["dvc", "queue", "logs", name], repo, check=False).stdout for name in ("ft1", "ft3")}
    assert status.count("Success") == 2, status + "\n".join(logs.values())
    for log in logs.values():
        assert "database is locked" not in log and "duplicate column" not in log, log
        ran = sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))
        # Only what the changed param feeds (the fine-tune recipe is scratch's too); no grid cell,
        # no pretraining run.
        assert ran == ["evaluate", "finetune", "scratch", "validate"], log
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))
    show = sh(["dvc", "exp", "show", "--json"], repo).stdout
    assert '"ft1"' in show and '"ft3"' in show
    _, runs = mlflow_runs(repo)
    spans = {}
    for name in ("ft1", "ft3"):
        mine = [r for r in runs if r.data.tags.get("dvc_exp") == name]
        assert sorted(r.data.tags["stage"] for r in mine) == ["evaluate", "finetune", "scratch"], name
        assert all(r.info.status == "FINISHED" for r in mine)
        spans[name] = (min(r.info.start_time for r in mine), max(r.info.end_time for r in mine))
    # They really ran at the same time: each started before the other finished.
    assert spans["ft1"][0] < spans["ft3"][1] and spans["ft3"][0] < spans["ft1"][1], spans
    assert len(runs) == 6


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_stopped_stage_ends_cleanly_and_its_run_is_killed(tiny_repo, sig, code, word):
    write_params(
        tiny_repo, tiny_params(**{"pretrain.batch_size": 4, "pretrain.phases": [{"epochs": 30, "augment": []}]})
    )
    assert cli(tiny_repo, "data").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "pretrain", "--patch", "4", "--mask", "0.5"],
        cwd=tiny_repo,
        env=env(PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if "epoch 1/30" in line:
            proc.send_signal(sig)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == f"maepipe: {word}" and "Traceback" not in stderr, stderr
    assert not (tiny_repo / "models").exists() and not (tiny_repo / "metrics").exists()
    _, runs = mlflow_runs(tiny_repo)
    pre = [r for r in runs if r.data.tags["stage"] == "pretrain"]
    assert [r.info.status for r in pre] == ["KILLED"]
