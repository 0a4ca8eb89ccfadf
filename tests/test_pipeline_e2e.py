"""The real thing on a tiny config: `dvc repro`, `dvc exp run -S ...`, queued experiments,
`dvc plots diff`, and the MLflow store they leave behind. No mocks."""
import json
import socket
import sys
import time

import pytest
import torch
import yaml

from conftest import cli, make_repo, sh, tiny_params, write_params

CELLS = ["p4-m0.5", "p4-m0.75", "p8-m0.5", "p8-m0.75"]
DOWNSTREAM = ["probe", "probe_random", "finetune", "scratch"]


def mlflow_runs(repo):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maepipe")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """One `dvc repro` of the tiny config in a fresh git repo, committed afterwards like a user would."""
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo", tiny_params())
    out = sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "repro"], repo)
    return repo, out.stdout


def test_repro_runs_every_stage_and_writes_outputs(repro):
    repo, log = repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    expected = {"data", "select", "evaluate", *DOWNSTREAM} | {f"pretrain@{c[1:].replace('-m', '-')}" for c in CELLS}
    assert set(lock) == expected
    for cell in CELLS:
        m = json.loads((repo / "metrics" / "pretrain" / f"{cell}.json").read_text())
        assert 0 < m["val_mse"] < 1 and m["val_loss"] > 0
        # Classification of val images from frozen features: far above chance (0.1) even here.
        assert 0.3 < m["knn_acc"] <= 1 and 0.3 < m["probe_acc"] <= 1
        curve = (repo / "plots" / "pretrain" / f"{cell}.csv").read_text().splitlines()
        assert curve[0] == "epoch,phase,train_loss,val_loss,val_mse" and len(curve) == 3
        assert (repo / "plots" / "images" / "recon" / f"{cell}.png").stat().st_size > 1000
        assert (repo / "plots" / "images" / "pretrain_curve" / f"{cell}.png").stat().st_size > 1000
        assert (repo / "models" / "mae" / f"{cell}.pt").is_file()
    sel = json.loads((repo / "metrics" / "select.json").read_text())
    grid = (repo / "plots" / "select" / "grid.csv").read_text().splitlines()
    assert len(grid) == 5 and "chosen" in grid[0]
    best = min(CELLS, key=lambda c: json.loads((repo / "metrics" / "pretrain" / f"{c}.json").read_text())["val_mse"])
    assert sel["cell"] == best and sel["metric"] == "val_mse"
    cell_metrics = {c: json.loads((repo / "metrics" / "pretrain" / f"{c}.json").read_text()) for c in CELLS}
    for view in ("knn_acc", "probe_acc"):
        top = max(cell_metrics[c][view] for c in CELLS)
        assert cell_metrics[sel["best_by"][view]][view] == top
    assert sel["best_by"]["val_mse"] == best
    for view in ("knn_acc", "probe_acc"):
        rho = sel[f"spearman_val_mse_vs_{view}"]
        assert rho is None or -1 <= rho <= 1
    assert (repo / "models" / "best.pt").read_bytes() == (repo / "models" / "mae" / f"{best}.pt").read_bytes()
    assert "| cell |" in (repo / "reports" / "grid.md").read_text()
    ev = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(ev) == set(DOWNSTREAM)
    for model in DOWNSTREAM:
        assert set(ev[model]) == {"accuracy", "auc_macro", "auc_micro", "auc_per_class"}
        assert len(ev[model]["auc_per_class"]) == 10
        assert 0 <= ev[model]["accuracy"] <= 1 and 0 <= ev[model]["auc_macro"] <= 1
        roc = (repo / "plots" / "evaluate" / f"roc_{model}.csv").read_text().splitlines()
        assert roc[0].startswith("fpr,0,1,") and roc[0].endswith(",micro") and roc[-1].startswith("1,1,1")
        confusion = (repo / "plots" / "evaluate" / f"confusion_{model}.csv").read_text().splitlines()
        assert confusion[0] == "actual,predicted" and len(confusion) == 1 + 359
    for name in ("roc.png", "confusion.png", "predictions.png", "grid/val_mse.png", "grid/knn_acc.png",
                 "grid/probe_acc.png"):
        assert (repo / "plots" / "images" / name).stat().st_size > 1000
    table = (repo / "reports" / "evaluate.md").read_text()
    assert all(f"| {m} |" in table for m in DOWNSTREAM)
    # Checkpoints, prepared data and the MLflow store stay out of git; small results go in.
    tracked = sh(["git", "ls-files"], repo).stdout.split()
    assert "metrics/select.json" in tracked and "plots/pretrain/p4-m0.5.csv" in tracked
    assert not [f for f in tracked if f.startswith(("models/", "data/")) or f == "mlflow.db"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout


def test_mlflow_store_has_one_run_per_stage(repro):
    repo, _ = repro
    client, runs = mlflow_runs(repo)
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["data", "select-" + json.loads((repo / "metrics/select.json").read_text())["cell"],
                            "evaluate"] + [f"pretrain-{c}" for c in CELLS]
                           + [n for n in names if n.split("-")[0] in DOWNSTREAM])
    for stage in DOWNSTREAM:
        assert sum(n.split("-")[0] == stage for n in names) == 1, names
    head = sh(["git", "rev-list", "--max-parents=0", "HEAD"], repo).stdout.strip()
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["stage"] == r.info.run_name.split("-")[0]
        assert r.data.tags["dataset"] == "digits" and r.data.tags["git_commit"] == head
    pre = next(r for r in runs if r.info.run_name == "pretrain-p4-m0.5")
    assert pre.data.tags["cell"] == "p4-m0.5"
    assert pre.data.params["pretrain.phases"] == "2xnone" and pre.data.params["model.dim"] == "32"
    assert 0 < pre.data.metrics["knn_acc"] <= 1 and 0 < pre.data.metrics["probe_acc"] <= 1
    assert [m.value for m in client.get_metric_history(pre.info.run_id, "phase")] == [1, 1]
    assert pre.data.params["patch"] == "4" and pre.data.params["mask_ratio"] == "0.5"
    # lr in params.yaml is per 256 images; batch 128 steps at half of it.
    lr = float(pre.data.params["pretrain.lr"])
    assert float(pre.data.params["pretrain.lr_scaled"]) == pytest.approx(lr * 128 / 256)
    assert pre.data.params["compile"] == "auto"
    history = client.get_metric_history(pre.info.run_id, "val_mse")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"p4-m0.5.png", "p4-m0.5.csv"} <= artifacts
    scratch = next(r for r in runs if r.info.run_name.startswith("scratch-"))
    assert scratch.data.params["init"] == "random" and scratch.data.tags["stage"] == "scratch"
    ev = next(r for r in runs if r.info.run_name == "evaluate")
    assert {"roc.png", "confusion.png", "predictions.png"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert "finetune_auc_macro" in ev.data.metrics


def test_pinning_a_cell_reruns_only_what_depends_on_it(repro):
    repo, _ = repro
    auto = json.loads((repo / "metrics" / "select.json").read_text())
    other = 8 if auto["patch"] == 4 else 4
    out = sh(["dvc", "exp", "run", "-n", "pinned", "-S", f"patch={other}"], repo)
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert ran[0] == "select" and ran[-1] == "evaluate" and sorted(ran[1:-1]) == sorted(DOWNSTREAM), out.stdout
    assert all(f"Stage 'pretrain@{c[1:].replace('-m', '-')}' didn't change, skipping" in out.stdout for c in CELLS)
    sel = json.loads((repo / "metrics" / "select.json").read_text())
    assert sel["patch"] == other and sel["cell"] != auto["cell"]
    show = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = [e for rev in show for e in (rev.get("experiments") or [])]
    assert any(e.get("name") == "pinned" for e in exps)
    diff = sh(["dvc", "metrics", "diff", "--json"], repo).stdout
    assert "metrics/select.json" in diff
    # The runs of the experiment are in the store, tagged with its name.
    _, runs = mlflow_runs(repo)
    tagged = sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("dvc_exp") == "pinned")
    assert tagged == sorted(["evaluate", "select", *DOWNSTREAM])
    # Pinning a patch size that is not in the grid is one clear error.
    bad = sh(["dvc", "exp", "run", "-S", "patch=2"], repo, check=False)
    assert bad.returncode != 0 and "patch = 2: not in grid.patch [4, 8]" in bad.stdout + bad.stderr
    # Back to the committed baseline for the tests that follow.
    sh(["git", "checkout", "--", "."], repo)
    sh(["dvc", "checkout", "--force"], repo)


def test_plots_diff_renders_between_commits(repro, tmp_path):
    repo, _ = repro
    out_dir = tmp_path / "plots_html"
    sh(["dvc", "plots", "diff", "HEAD", "--json"], repo)  # parses every declared plot
    sh(["dvc", "plots", "diff", "HEAD", "-o", str(out_dir)], repo)
    html = (out_dir / "index.html").read_text()
    for name in ("roc_finetune.csv", "roc_scratch.csv", "confusion_probe.csv", "p4-m0.5.csv", "knn_acc.png",
                 "ROC (micro-average)", "pretrained vs from scratch"):
        assert name in html, name


def test_queued_experiment_logs_to_the_root_store(repro):
    """`--queue` runs in a temporary copy without git-ignored files; the store must be DVC_ROOT's."""
    repo, _ = repro
    # A smaller grid (no dvc.yaml edit) and a shorter fine-tune, so finetune and evaluate must run.
    sh(["dvc", "exp", "run", "--queue", "-n", "queued", "-S", "grid.patch=[4]", "-S", "patch=auto",
        "-S", "finetune.epochs=1"], repo)
    sh(["dvc", "queue", "start"], repo)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo).stdout
        if "queued" in status and ("Success" in status or "Failed" in status):
            break
        time.sleep(3)
    assert "Success" in status, status + sh(["dvc", "queue", "logs", "queued"], repo, check=False).stdout
    logs = sh(["dvc", "queue", "logs", "queued"], repo).stdout
    ran = sorted(line.split("'")[1] for line in logs.splitlines() if line.startswith("Running stage"))
    assert "select" in ran and "finetune" in ran and "evaluate" in ran
    assert not [s for s in ran if s.startswith("pretrain")]
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))
    # Every stage the queued run executed logged to the repo root's store, tagged with its name.
    _, runs = mlflow_runs(repo)
    assert sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("dvc_exp") == "queued") == ran
    show = sh(["dvc", "exp", "show", "--json"], repo).stdout
    assert '"queued"' in show


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_one_clear_error(tiny_repo):
    uri = f"http://127.0.0.1:{_free_port()}"
    out = cli(tiny_repo, "data", MLFLOW_TRACKING_URI=uri)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert f"MLFLOW_TRACKING_URI = {uri} cannot be reached" in out.stderr
    assert not (tiny_repo / "data" / "prepared").exists()


def test_nan_loss_stops_pretrain_without_outputs(tiny_repo):
    write_params(tiny_repo, tiny_params(**{"pretrain.lr": 1e30}))
    assert cli(tiny_repo, "data").returncode == 0
    out = cli(tiny_repo, "pretrain", "--patch", "4", "--mask", "0.5")
    assert out.returncode == 2, out.stderr
    assert "pretrain p4-m0.5: the training loss became" in out.stderr and "Traceback" not in out.stderr
    assert not (tiny_repo / "models").exists() and not (tiny_repo / "metrics").exists()


def test_cpu_runs_are_identical(tiny_repo):
    assert cli(tiny_repo, "data").returncode == 0
    results = []
    for _ in range(2):
        out = cli(tiny_repo, "pretrain", "--patch", "8", "--mask", "0.75")
        assert out.returncode == 0, out.stderr
        results.append((tiny_repo / "metrics" / "pretrain" / "p8-m0.75.json").read_text()
                       + (tiny_repo / "plots" / "pretrain" / "p8-m0.75.csv").read_text())
    assert results[0] == results[1]


def test_missing_upstream_output_is_a_clear_error(tiny_repo):
    out = cli(tiny_repo, "probe")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "prepared file data/prepared/downstream.npz is missing" in out.stderr


def test_bench_runs_and_writes_its_table(tiny_repo):
    """`make bench` must not rot; its numbers are not asserted (a benchmark, not a timed test)."""
    assert cli(tiny_repo, "data").returncode == 0
    out = sh([sys.executable, "-m", "pipeline.bench", "--steps", "1", "--patches", "4,8"], tiny_repo)
    result = json.loads((tiny_repo / "bench" / "results-cpu.json").read_text())
    assert [r["what"] for r in result["rows"]] == ["MAE pretrain p4-m0.5", "MAE pretrain p8-m0.5",
                                                   "probe epoch p8", "finetune epoch p8"]
    assert all(r["naive_img_s"] > 0 and r["maepipe_img_s"] > 0 for r in result["rows"])
    assert result["rows"][0]["gflop_per_img"] > 0 and result["torch"] == torch.__version__
    assert "x" in out.stdout and "results-cpu.json" in out.stdout


def test_dvc_remote_round_trip_needs_no_retraining(repro, tmp_path):
    """Push the repro's outputs to a folder remote; a fresh clone pulls them and is up to date."""
    repo, _ = repro
    sh(["git", "checkout", "--", "."], repo)
    sh(["dvc", "checkout", "--force"], repo)
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    sh(["git", "commit", "-qm", "add a DVC remote", ".dvc/config"], repo)
    try:
        sh(["dvc", "push"], repo)
        assert any(remote.rglob("*")), "the remote is empty after dvc push"
        clone = tmp_path / "clone"
        sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
        sh(["dvc", "pull"], clone)
        assert (clone / "models" / "finetune.pt").read_bytes() == (repo / "models" / "finetune.pt").read_bytes()
        assert (clone / "data" / "prepared" / "pretrain.npz").is_file()
        assert "up to date" in sh(["dvc", "status"], clone).stdout
        out = sh(["dvc", "repro"], clone).stdout
        assert "Running stage" not in out, out
        assert not (clone / "mlflow.db").exists(), "a pulled clone retrained something"
    finally:
        sh(["dvc", "remote", "remove", "shared"], repo)
        sh(["git", "commit", "-qm", "remove the DVC remote", ".dvc/config"], repo)


def test_kill_9_mid_pretrain_then_repro_finishes_with_the_same_results(repro, tmp_path):
    """SIGKILL the whole `dvc repro` (as an OOM killer or a lost node would) inside a pretrain
    cell; the next `dvc repro` finishes and every metric equals the uninterrupted run's."""
    import os
    import signal
    import subprocess

    from conftest import env

    base, _ = repro
    repo = make_repo(tmp_path / "repo", tiny_params())
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            # The second cell has started and finished one epoch: kill in the middle of it.
            if line.startswith("pretrain p4-m0.75 epoch 1/2"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (repo / "metrics" / "pretrain" / "p4-m0.75.json").exists()
    out = sh(["dvc", "repro"], repo).stdout
    assert "Running stage 'pretrain@4-0.75'" in out and "Stage 'pretrain@4-0.5' didn't change" in out
    for rel in ["metrics/select.json", "metrics/evaluate.json",
                *[f"metrics/pretrain/{c}.json" for c in CELLS], *[f"plots/pretrain/{c}.csv" for c in CELLS]]:
        assert (repo / rel).read_text() == (base / rel).read_text(), rel
    assert "up to date" in sh(["dvc", "status"], repo).stdout
