"""A team's tracking server for real: PostgreSQL + `mlflow server --serve-artifacts` started by
tools/tracking_server.py (what `make mlflow-server` runs), a tiny `dvc repro` logging to it over HTTP
with `MLFLOW_TRACKING_URI`, and the runs read back through the MLflow client. No mocks.

Needs Debian's `postgresql` package and psycopg2 (requirements.txt); without them the test is
skipped, saying how to install them. With MAEPIPE_REQUIRE_POSTGRES=1 (CI) it fails instead."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import sh

from pipeline.errors import UserError
from tools import tracking_server as server


def _missing() -> str | None:
    try:
        server.find_postgres()
        server.check_driver()
    except UserError as e:
        return str(e)
    return None


@pytest.fixture
def tracking_server():
    why = _missing()
    if why:
        message = f"needs PostgreSQL and psycopg2: {why}"
        if os.environ.get("MAEPIPE_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # Not tmp_path: as root, PostgreSQL runs as the `postgres` user, which cannot enter pytest's
    # private /tmp/pytest-of-root; and a short path keeps the unix socket path within its limit.
    top = Path(tempfile.mkdtemp(prefix="maepipe-mlflow-"))
    top.chmod(0o755)
    log = top / "mlflow-server.log"
    try:
        with server.running(top / "server", log=log) as srv:
            yield srv
    except BaseException:
        for path in (log, top / "server" / "postgresql.log"):
            if path.exists():
                print(f"--- {path} (tail) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_pipeline_logs_to_a_postgres_backed_tracking_server(tracking_server, repro_copy, tmp_path):
    """A grid cell, an arm (its classifiers as logged models) and evaluate (the registry) re-run on
    a repo that has run, logging to the server over HTTP: runs, params, metrics, artifacts and the
    registered champion read back through it."""
    import mlflow

    srv = tracking_server
    assert srv.uri == f"http://127.0.0.1:{srv.port}"
    assert srv.backend_uri.startswith("postgresql+psycopg2://") and f":{srv.pg_port}/mlflow" in srv.backend_uri
    repo = repro_copy
    shutil.rmtree(repo / "mlruns")
    (repo / "mlflow.db").unlink()
    for stage in ("pretrain@4-0.5", "probe", "evaluate"):
        sh(["dvc", "repro", "-f", "-s", stage], repo, MLFLOW_TRACKING_URI=srv.uri)

    # Everything went to the server: no local store in the repo.
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()
    assert not (repo / "mlartifacts").exists()

    client = mlflow.MlflowClient(tracking_uri=srv.uri)
    exp = client.get_experiment_by_name("maepipe")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "stage" in r.data.tags]
    runs = [r for r in runs if "dvc_not_run" not in r.data.tags]
    cells = json.loads((repo / "metrics" / "select.json").read_text())["repetitions"]
    arms_cell = ",".join(sorted({c["cell"] for c in cells.values()}))
    assert sorted(r.info.run_name for r in runs) == sorted(["pretrain-p4-m0.5", f"probe-{arms_cell}", "evaluate"])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    probe = next(r for r in runs if r.data.tags["stage"] == "probe")
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{probe.info.run_id}'")
    assert sorted(m.name for m in models) == ["probe-r0", "probe-r1"]
    champion = client.get_model_version_by_alias("maepipe-digits", "champion")
    assert champion.tags["arm"] in ("finetune", "probe") and float(champion.tags["dev_acc"]) > 0

    pre = next(r for r in runs if r.info.run_name == "pretrain-p4-m0.5")
    assert pre.data.tags["stage"] == "pretrain" and pre.data.tags["cell"] == "p4-m0.5"
    assert pre.data.params["model.dim"] == "32" and pre.data.params["pretrain.phases"] == "2xnone"
    assert pre.data.params["patch"] == "4" and pre.data.params["mask_ratio"] == "0.5"
    history = client.get_metric_history(pre.info.run_id, "val_mse")
    assert [m.step for m in history] == [1, 2] and all(0 < m.value < 1 for m in history)
    metrics = json.loads((repo / "metrics" / "pretrain" / "p4-m0.5.json").read_text())
    assert history[-1].value == pytest.approx(metrics["val_mse"])

    # Artifacts: listed and downloaded through the server, byte for byte what the stage wrote.
    assert {"p4-m0.5.png", "p4-m0.5.csv"} <= {a.path for a in client.list_artifacts(pre.info.run_id)}
    got = Path(client.download_artifacts(pre.info.run_id, "p4-m0.5.csv", str(tmp_path / "download")))
    assert got.read_bytes() == (repo / "plots" / "pretrain" / "p4-m0.5.csv").read_bytes()
    ev = next(r for r in runs if r.info.run_name == "evaluate")
    ev_json = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert ev.data.metrics["finetune_accuracy_mean"] == pytest.approx(ev_json["arms"]["finetune"]["accuracy_mean"])
    assert {"roc.png", "confusion.png"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}

    # ... and they live in the server's artifacts directory, not anywhere near the repo.
    stored = list(srv.artifacts.rglob("p4-m0.5.csv"))
    assert len(stored) == 1 and pre.info.run_id in stored[0].parts, stored
    assert stored[0].read_bytes() == got.read_bytes()
