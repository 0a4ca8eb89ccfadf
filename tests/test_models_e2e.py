"""The path from training to a served model: each arm's classifiers as MLflow models, the registry's
champion chosen on val, and `mlflow models serve` answering over HTTP with evaluate's classes."""

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
    from pipeline import data

    d = data.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    return (d["x_test"], d["y_test"]) if n is None else (d["x_test"][:n], d["y_test"][:n])


def _evaluate_classes(repo, arm, k):
    with open(repo / "plots" / "evaluate" / "predictions.csv") as f:
        return np.array([int(r[f"{arm}_s{k}"]) for r in csv.DictReader(f)])


def _champion(repo):
    version = _client(repo).get_model_version_by_alias(REGISTRY, "champion")
    seeds = json.loads((repo / "metrics" / "evaluate.json").read_text())["seeds"]
    return version, version.tags["arm"], seeds.index(int(version.tags["seed"]))


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
        assert sorted(m.name for m in models) == [f"{arm}-s0", f"{arm}-s1"], arm
        for m in models:
            from pipeline import fsutil

            k = int(m.name[-1])
            assert m.tags["checkpoint_md5"] == fsutil.md5(repo / "models" / arm / f"s{k}.pt")
            info = mlflow.models.get_model_info(m.model_uri)
            assert info.signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"


def test_champion_loads_in_a_fresh_process_outside_the_repo(repro_template, tmp_path):
    """No repo on the path, another working directory: the model brings its code and normalises
    its own uint8 input, and gives evaluate's classes for the test images."""
    repo, _ = repro_template
    version, arm, k = _champion(repo)
    assert arm in ("finetune", "probe")  # never a control
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
    for key in ("git_commit", "cell", "labels_per_class", "checkpoint_md5", "val_acc"):
        assert version.tags[key], key


def test_champion_moves_only_when_a_candidate_beats_it_on_val(repro_copy):
    """A trained classifier and an untrained one of the same shape, registered in turn."""
    import mlflow
    import torch

    from pipeline import checkpoint, data, serving
    from pipeline.model import Classifier, Encoder

    repo = repro_copy
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    d = data.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    good = repo / "models" / "finetune" / "s0.pt"
    ckpt = checkpoint.load(good)
    torch.manual_seed(0)
    untrained = Classifier(Encoder(checkpoint.build_classifier(ckpt).encoder.cfg), **ckpt["head"])
    bad = repo / "untrained.pt"
    checkpoint.save(bad, checkpoint.classifier_payload(untrained, ckpt["head"], stage="test"))
    name, classes = "maepipe-test", [str(c) for c in d["classes"]]
    outcomes = []
    mlflow.set_experiment("registry-test")
    for path in (bad, good, bad):
        with mlflow.start_run():
            info = serving.log_classifier(mlflow, "clf", path, classes, d["x_val"], {})
        outcomes.append(serving.register_champion(mlflow, name, info.model_uri, d["x_val"], d["y_val"], {}))
    assert [o["promoted"] for o in outcomes] == [True, True, False]
    assert outcomes[1]["val_acc"] > outcomes[0]["val_acc"] == pytest.approx(outcomes[2]["val_acc"])
    assert outcomes[2]["previous_val_acc"] == pytest.approx(outcomes[1]["val_acc"])
    assert _client(repo).get_model_version_by_alias(name, "champion").version == outcomes[1]["version"]


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
