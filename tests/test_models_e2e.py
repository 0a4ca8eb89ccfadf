"""The path from training to a served model: each arm's classifiers as MLflow models, the registry's
champion chosen on the repetitions' dev labels (inside the budget, never val), and `mlflow models
serve` answering over HTTP with evaluate's classes."""

import csv
import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import env, free_port, mlflow_runs

REGISTRY = "maepipe-digits"


def _client(repo):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def _test_images(repo, n=None):
    from pipeline import prepared

    d = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    return (d["x_test"], d["y_test"]) if n is None else (d["x_test"][:n], d["y_test"][:n])


def _evaluate_classes(repo, arm, k):
    with open(repo / "plots" / "evaluate" / "predictions.csv") as f:
        return np.array([int(r[f"{arm}_r{k}"]) for r in csv.DictReader(f)])


def _champion(repo):
    version = _client(repo).get_model_version_by_alias(REGISTRY, "champion")
    return version, version.tags["arm"], int(version.tags["repetition"])


def test_every_arm_logs_its_classifiers_as_models(repro_template):
    import mlflow

    repo, _ = repro_template
    client, runs = mlflow_runs(repo)
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    for arm in ("probe", "probe_random", "finetune", "scratch"):
        run = next(r for r in runs if r.data.tags["stage"] == arm)
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run.info.run_id}'",
            output_format="list",
        )
        assert sorted(m.name for m in models) == [f"{arm}-r0", f"{arm}-r1"], arm
        for m in models:
            from pipeline import fsutil

            k = int(m.name[-1])
            assert m.tags["checkpoint_md5"] == fsutil.md5(repo / "models" / arm / f"r{k}.pt")
            assert m.tags["repetition"] == str(k) and m.tags["arm"] == arm
            info = mlflow.models.get_model_info(m.model_uri)
            assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"


def test_champion_loads_in_a_fresh_process_outside_the_repo(repro_template, tmp_path):
    """No repo on the path, another working directory: the model brings its code and normalises
    its own uint8 input, and gives evaluate's classes for the test images."""
    repo, _ = repro_template
    version, arm, k = _champion(repo)
    assert arm in ("finetune", "probe")  # never a control
    # The candidate with the best dev accuracy of its own repetition, as the arms recorded it.
    dev = {
        (a, r["repetition"]): r["dev_acc"]
        for a in ("finetune", "probe")
        for r in json.loads((repo / "metrics" / f"{a}.json").read_text())["repetitions"]
    }
    assert dev[arm, k] == max(dev.values()) and float(version.tags["dev_acc"]) == pytest.approx(dev[arm, k])
    assert version.tags["dev_images"] == "20"
    x, _ = _test_images(repo)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import mlflow, numpy as np, sys\n"
        "assert not any('pipeline' in p for p in sys.path)\n"
        f"mlflow.set_tracking_uri('sqlite:///{repo / 'mlflow.db'}')\n"
        f"m = mlflow.pyfunc.load_model('models:/{REGISTRY}@champion')\n"
        "out = m.predict(np.load('x.npy'))\n"
        "print(' '.join(map(str, out['class'].tolist())))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    served = np.array([int(c) for c in run.stdout.split()])
    np.testing.assert_array_equal(served, _evaluate_classes(repo, arm, k))
    from pipeline import fsutil

    head = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=repo, capture_output=True, text=True)
    cells = json.loads((repo / "metrics" / "select.json").read_text())["repetitions"]
    assert version.tags["git_commit"] == head.stdout.strip()
    assert version.tags["cell"] == cells[f"r{k}"]["cell"] and version.tags["seed"] == str(1000 * k)
    assert version.tags["labels_per_class"] == "20" and version.tags["checkpoint"] == f"models/{arm}/r{k}.pt"
    assert version.tags["checkpoint_md5"] == fsutil.md5(repo / "models" / arm / f"r{k}.pt")


def test_champion_moves_only_when_a_candidate_beats_it_on_dev(repro_copy):
    """Versions registered in turn with their dev accuracies: the alias moves only on a better one;
    a champion that records none (an older maepipe's) is replaced."""
    import mlflow

    from pipeline import prepared, serving

    repo = repro_copy
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    d = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    path = repo / "models" / "finetune" / "r0.pt"
    name, classes = "maepipe-test", [str(c) for c in d["classes"]]
    mlflow.set_experiment("registry-test")
    with mlflow.start_run():
        info = serving.log_classifier(mlflow, "clf", path, classes, d["x_val"][:2], {})
    client = _client(repo)
    old = mlflow.register_model(info.model_uri, name)  # no dev_acc tag
    client.set_registered_model_alias(name, "champion", old.version)
    outcomes = [serving.register_champion(mlflow, name, info.model_uri, acc, {}) for acc in (0.4, 0.7, 0.6, 0.7)]
    assert [o["promoted"] for o in outcomes] == [True, True, False, False]
    assert [o["previous_dev_acc"] for o in outcomes] == [None, 0.4, 0.7, 0.7]
    assert client.get_model_version_by_alias(name, "champion").version == outcomes[1]["version"]
    assert client.get_model_version(name, outcomes[2]["version"]).tags["dev_acc"] == "0.600000"


def test_mlflow_models_serve_answers_with_evaluates_classes(repro_template):
    repo, _ = repro_template
    _, arm, k = _champion(repo)
    port = free_port()
    cmd = [
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{REGISTRY}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        x, _ = _test_images(repo, 32)
        body = json.dumps({"inputs": x.tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        classes = [row["class"] for row in answer["predictions"]]
        assert classes == _evaluate_classes(repo, arm, k)[:32].tolist()
        assert {f"p_{c}" for c in range(10)} <= set(answer["predictions"][0])
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
