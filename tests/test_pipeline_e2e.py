"""The real thing on a tiny config: `dvc repro`, `dvc exp run -S ...`, queued experiments,
`dvc plots diff`, and the MLflow store they leave behind. No mocks."""

import json
import sys
import time

import pytest
import torch
import yaml
from conftest import CELLS, DOWNSTREAM, cli, free_port, make_repo, mlflow_runs, sh, tiny_params, write_params


@pytest.fixture
def repro(repro_template):
    return repro_template


def _json(repo, rel):
    return json.loads((repo / rel).read_text())


def _csv(repo, rel):
    import csv

    with open(repo / rel) as f:
        return list(csv.DictReader(f))


def test_repro_runs_every_stage_and_writes_grid_outputs(repro):
    repo, log = repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    expected = {"validate", "data", "budget", "select", "pretrain_full", "evaluate", *DOWNSTREAM} | {
        f"pretrain@{c[1:].replace('-m', '-')}" for c in CELLS
    }
    assert set(lock) == expected
    for cell in CELLS:
        m = _json(repo, f"metrics/pretrain/{cell}.json")
        assert m["val_loss"] > 0 and m["steps"] == 2 * (1294 // 128)
        assert m["mask_ratio_effective"] == m["mask_ratio"]  # 4 and 16 patches: 0.5 and 0.75 are exact
        curve = (repo / "plots" / "pretrain" / f"{cell}.csv").read_text().splitlines()
        assert curve[0] == "epoch,phase,train_loss,val_loss,val_mse" and len(curve) == 3
        assert float(curve[-1].split(",")[-1]) == pytest.approx(m["val_mse"], rel=1e-5)
        assert (repo / "plots" / "images" / "recon" / f"{cell}.png").stat().st_size > 1000
        assert (repo / "plots" / "images" / "pretrain_curve" / f"{cell}.png").stat().st_size > 1000
        assert (repo / "models" / "mae" / f"{cell}.pt").is_file()


def test_select_scores_cells_on_the_budget_and_picks_by_its_metric(repro):
    repo, _ = repro
    sel = _json(repo, "metrics/select.json")
    grid = _csv(repo, "plots/select/grid.csv")
    assert [r["cell"] for r in grid] == CELLS
    score = {r["cell"]: float(r["knn_acc"]) for r in grid}
    # Default select.metric is knn_acc: the highest, ties to the larger patch then the smaller ratio.
    top = max(score.values())
    expected = sorted((c for c in CELLS if score[c] == top), key=lambda c: (-int(c[1:].split("-")[0]), c))[0]
    assert sel["metric"] == "knn_acc" and sel["cell"] == expected
    assert [r["cell"] for r in grid if r["chosen"] == "True"] == [expected]
    # Scored on the budget alone: 20 labels per class of the first downstream seed.
    assert sel["labels_used"] == 200
    # The pixels and random-encoder floors are scored the same way; pixels classify digits well.
    assert set(sel["floors"]) == {"random encoder, patch 4", "random encoder, patch 8", "raw pixels (PCA to 32)"}
    assert sel["floors"]["raw pixels (PCA to 32)"]["knn_acc"] > 0.6
    for view in ("knn_acc", "probe_acc"):
        top_cell = max(grid, key=lambda r: float(r[view]))["cell"]
        assert float(next(r for r in grid if r["cell"] == sel["best_by"][view])[view]) == float(
            next(r for r in grid if r["cell"] == top_cell)[view]
        )
    from scipy.stats import spearmanr

    rho = spearmanr([-float(r["val_mse"]) for r in grid], [float(r["probe_acc"]) for r in grid]).statistic
    assert sel["spearman_val_mse_vs_probe_acc"] == pytest.approx(rho)
    assert (repo / "models" / "best.pt").read_bytes() == (repo / "models" / "mae" / f"{expected}.pt").read_bytes()
    assert "## Floors" in (repo / "reports" / "grid.md").read_text()


def test_pretrain_full_continues_the_selected_cell_on_all_training_images(repro):
    repo, _ = repro
    full = _json(repo, "metrics/pretrain_full.json")
    sel = _json(repo, "metrics/select.json")
    assert full["cell"] == sel["cell"] and full["train_images"] == 1294
    assert full["steps"] == 2 * (1294 // 128) and full["grid_steps"] == 2 * (1294 // 128)
    # It starts from the grid's weights, so its val MSE improves on the cell's.
    assert full["val_mse"] < full["grid_val_mse"]


def test_downstream_arms_repeat_per_seed_on_their_label_budget(repro):
    repo, _ = repro
    for arm in DOWNSTREAM:
        m = _json(repo, f"metrics/{arm}.json")
        assert [s["seed"] for s in m["seeds"]] == [0, 1000] and all(s["labels"] == 200 for s in m["seeds"])
        accs = [s["val_acc"] for s in m["seeds"]]
        assert m["val_acc_mean"] == pytest.approx(sum(accs) / 2)
        assert [p.name for p in sorted((repo / "models" / arm).iterdir())] == ["s0.pt", "s1.pt"]
        curve = _csv(repo, f"plots/{arm}/curve.csv")
        steps = 30 if arm.startswith("probe") else 20
        assert int(curve[-1]["step"]) == steps and len(curve) == 10
        assert float(curve[-1]["val_acc"]) == pytest.approx(m["val_acc_mean"], rel=1e-5)
    # The frozen MAE features beat chance (0.1) by far even on this tiny config.
    assert _json(repo, "metrics/probe.json")["val_acc_mean"] > 0.25


def test_evaluate_is_recomputable_from_the_committed_predictions(repro):
    """Every accuracy and every paired interval in evaluate.json follows from predictions.csv."""
    import numpy as np

    from pipeline import stats

    repo, _ = repro
    ev = _json(repo, "metrics/evaluate.json")
    rows = _csv(repo, "plots/evaluate/predictions.csv")
    assert len(rows) == ev["test_images"] == 359 and ev["labels"] == 200 and ev["seeds"] == [0, 1000]
    label = np.array([int(r["label"]) for r in rows])
    correct = {}
    for arm in (*DOWNSTREAM, "pixels_logreg"):
        pred = np.array([[int(r[f"{arm}_s{k}"]) for r in rows] for k in range(2)])
        correct[arm] = pred == label[None]
        accs = correct[arm].mean(1)
        assert [s["accuracy"] for s in ev["arms"][arm]["seeds"]] == pytest.approx(list(accs))
        assert ev["arms"][arm]["accuracy_mean"] == pytest.approx(accs.mean())
        assert ev["arms"][arm]["accuracy_sd"] == pytest.approx(accs.std(ddof=1))
        assert len(ev["arms"][arm]["auc_per_class"]) == 10
    assert ev["arms"]["pixels_logreg"]["accuracy_mean"] > 0.8  # the floor is a real classifier
    for a, b in (("finetune", "scratch"), ("probe", "probe_random")):
        c = ev["comparisons"][f"{a}-{b}"]
        again = stats.paired_bootstrap(correct[a], correct[b], seed=0)
        assert c["diff"] == pytest.approx(correct[a].mean() - correct[b].mean())
        assert (c["ci_low"], c["ci_high"]) == pytest.approx((again["ci_low"], again["ci_high"]))
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
        assert c["mcnemar_p"] == pytest.approx([stats.mcnemar(correct[a][k], correct[b][k])["p"] for k in range(2)])
    for arm in (*DOWNSTREAM, "pixels_logreg"):
        roc = (repo / "plots" / "evaluate" / f"roc_{arm}.csv").read_text().splitlines()
        assert roc[0].startswith("fpr,0,1,") and roc[0].endswith(",micro") and roc[-1].startswith("1,1,1")
        confusion = _csv(repo, f"plots/evaluate/confusion_{arm}.csv")
        assert len(confusion) == 359
        assert [int(r["predicted"]) for r in confusion] == [int(r[f"{arm}_s0"]) for r in rows]
    for name in (
        "roc.png",
        "confusion.png",
        "predictions.png",
        "grid/val_mse.png",
        "grid/knn_acc.png",
        "grid/probe_acc.png",
    ):
        assert (repo / "plots" / "images" / name).stat().st_size > 1000
    table = (repo / "reports" / "evaluate.md").read_text()
    assert all(f"| {m} |" in table for m in DOWNSTREAM) and "| finetune-scratch |" in table


def test_small_results_are_in_git_and_artefacts_are_not(repro):
    repo, _ = repro
    tracked = sh(["git", "ls-files"], repo).stdout.split()
    assert {"metrics/select.json", "plots/pretrain/p4-m0.5.csv", "plots/evaluate/predictions.csv"} <= set(tracked)
    assert not [f for f in tracked if f.startswith(("models/", "data/")) or f == "mlflow.db"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout


def test_mlflow_store_has_one_run_per_stage(repro):
    repo, _ = repro
    client, runs = mlflow_runs(repo)
    names = sorted(r.info.run_name for r in runs)
    chosen = _json(repo, "metrics/select.json")["cell"]
    assert names == sorted(
        ["data", f"select-{chosen}", f"pretrain_full-{chosen}", "evaluate"]
        + [f"pretrain-{c}" for c in CELLS]
        + [f"{arm}-{chosen}" for arm in DOWNSTREAM]
    )
    head = sh(["git", "rev-list", "--max-parents=0", "HEAD"], repo).stdout.strip()
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["stage"] == r.info.run_name.split("-")[0]
        assert r.data.tags["dataset"] == "digits" and r.data.tags["git_commit"] == head
    pre = next(r for r in runs if r.info.run_name == "pretrain-p4-m0.5")
    assert pre.data.tags["cell"] == "p4-m0.5"
    assert pre.data.params["pretrain.phases"] == "2xnone" and pre.data.params["model.dim"] == "32"
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
    assert "finetune_auc_macro_mean" in ev.data.metrics and "finetune-scratch_ci_low" in ev.data.metrics
    ft = next(r for r in runs if r.info.run_name.startswith("finetune-"))
    # Every lr is per 256 images: batch 64 steps at a quarter of it.
    assert float(ft.data.params["finetune.lr_encoder_scaled"]) == pytest.approx(
        float(ft.data.params["finetune.lr_encoder"]) * 64 / 256
    )
    assert [m.step for m in client.get_metric_history(ft.info.run_id, "val_acc_s1")] == list(range(2, 22, 2))


def test_runs_are_grouped_under_one_parent_per_invocation(repro):
    """One `dvc repro`: one parent run showing the selected cell and the summary, a `grid` run
    holding the cells, every other stage directly under the parent; datasets and system metrics."""
    from pipeline import fsutil

    repo, _ = repro
    client, groups = mlflow_runs(repo, "grouping")
    top = [r for r in groups if r.data.tags["maepipe.level"] == "pipeline"]
    grid = [r for r in groups if r.data.tags["maepipe.level"] == "grid"]
    assert len(top) == 1 and len(grid) == 1 and grid[0].data.tags["mlflow.parentRunId"] == top[0].info.run_id
    _, runs = mlflow_runs(repo)
    for r in runs:
        want = grid[0] if r.data.tags["stage"] == "pretrain" else top[0]
        assert r.data.tags["mlflow.parentRunId"] == want.info.run_id, r.info.run_name
    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    assert top[0].data.tags["encoder"] == summary["encoder"] and top[0].data.tags["budget"] == "20"
    assert top[0].data.metrics["finetune"] == pytest.approx(summary["finetune"])
    assert top[0].data.tags["ft-scratch_ci"] == summary["ft-scratch_ci"]
    assert not mlflow_runs(repo, "not_run")[1]  # every stage ran
    data_run = next(r for r in runs if r.info.run_name == "data")
    digests = {d.dataset.name: d.dataset.digest for d in data_run.inputs.dataset_inputs}
    assert digests == {
        "digits-pretrain": fsutil.md5(repo / "data" / "prepared" / "pretrain.npz"),
        "digits-downstream": fsutil.md5(repo / "data" / "prepared" / "downstream.npz"),
    }
    ev = next(r for r in runs if r.info.run_name == "evaluate")
    assert any(k.startswith("system/") for k in ev.data.metrics), sorted(ev.data.metrics)


def test_pinning_a_cell_reruns_only_what_depends_on_it(repro_copy):
    repo = repro_copy
    auto = json.loads((repo / "metrics" / "select.json").read_text())
    other = 8 if auto["patch"] == 4 else 4
    out = sh(["dvc", "exp", "run", "-n", "pinned", "-S", f"patch={other}"], repo)
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
    # The pin changes which cell is pretrained on and fine-tuned; the controls copy its architecture.
    assert ran[:3] == ["validate", "select", "pretrain_full"] and ran[-1] == "evaluate", out.stdout
    assert sorted(ran[3:-1]) == sorted(DOWNSTREAM), out.stdout
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
    assert tagged == sorted(["evaluate", "select", "pretrain_full", *DOWNSTREAM])
    # One parent named by the experiment; the stages DVC did not run are there too, marked so.
    _, groups = mlflow_runs(repo, "grouping")
    parent = [
        r for r in groups if r.data.tags.get("dvc_exp") == "pinned" and r.data.tags["maepipe.level"] == "pipeline"
    ]
    assert [r.info.run_name for r in parent] == ["pinned"]
    _, notes = mlflow_runs(repo, "not_run")
    assert sorted(r.info.run_name for r in notes if r.data.tags.get("dvc_exp") == "pinned") == sorted(
        ["data", *(f"pretrain-{c}" for c in CELLS)]
    )
    cell_note = next(r for r in notes if r.info.run_name == "pretrain-p4-m0.5")
    assert cell_note.data.metrics["val_mse"] == pytest.approx(
        json.loads((repo / "metrics" / "pretrain" / "p4-m0.5.json").read_text())["val_mse"]
    )
    # Pinning a patch size that is not in the grid is one clear error.
    bad = sh(["dvc", "exp", "run", "-S", "patch=2"], repo, check=False)
    assert bad.returncode != 0 and "patch = 2: not in grid.patch [4, 8]" in bad.stdout + bad.stderr


def test_plots_diff_renders_between_revisions(repro_copy, tmp_path):
    """`dvc plots diff` of the committed run against an experiment: every declared plot renders
    for both revisions, with no error."""
    repo = repro_copy
    sh(["dvc", "exp", "run", "-n", "shorter", "-S", "finetune.steps=10"], repo)
    result = json.loads(sh(["dvc", "plots", "diff", "HEAD", "shorter", "--json"], repo).stdout)
    assert not result.get("errors"), result.get("errors")
    data = result["data"]
    for name in ("plots/finetune/curve.csv", "plots/evaluate/roc_scratch.csv", "plots/pretrain/p4-m0.5.csv"):
        revisions = {r for plot in data[name] for r in plot.get("revisions", [])}
        assert revisions == {"HEAD", "shorter"}, (name, revisions)
    out_dir = tmp_path / "plots_html"
    sh(["dvc", "plots", "diff", "HEAD", "shorter", "-o", str(out_dir)], repo)
    html = (out_dir / "index.html").read_text()
    for name in (
        "roc_finetune.csv",
        "roc_scratch.csv",
        "confusion_probe.csv",
        "p4-m0.5.csv",
        "knn_acc.png",
        "ROC (micro-average",
        "pretrained vs from scratch",
        "recon_full.png",
        "shorter",
    ):
        assert name in html, name


def test_queued_experiment_logs_to_the_root_store(repro_copy):
    """`--queue` runs in a temporary copy without git-ignored files; the store must be DVC_ROOT's."""
    repo = repro_copy
    # A smaller grid (no dvc.yaml edit) and a shorter fine-tune, so finetune and evaluate must run.
    sh(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            "queued",
            "-S",
            "grid.patch=[4]",
            "-S",
            "patch=auto",
            "-S",
            "finetune.steps=10",
        ],
        repo,
    )
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
    assert not [s for s in ran if s.startswith("pretrain@")]  # no grid cell; pretrain_full of the new choice
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))
    # Every stage the queued run executed logged to the repo root's store, tagged with its name
    # (validate and budget are checks that log nothing).
    _, runs = mlflow_runs(repo)
    logged = [s for s in ran if s not in ("validate", "budget")]
    assert sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("dvc_exp") == "queued") == logged
    show = sh(["dvc", "exp", "show", "--json"], repo).stdout
    assert '"queued"' in show


def test_unreachable_tracking_server_is_one_clear_error(tiny_repo):
    uri = f"http://127.0.0.1:{free_port()}"
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
        results.append(
            (tiny_repo / "metrics" / "pretrain" / "p8-m0.75.json").read_text()
            + (tiny_repo / "plots" / "pretrain" / "p8-m0.75.csv").read_text()
        )
    assert results[0] == results[1]


def test_another_core_count_changes_only_the_last_digits(tiny_repo):
    """What reproduces where: the same machine gives the same bytes (above); a machine with another
    number of cores sums in another order, so the last digits move and nothing else."""
    assert cli(tiny_repo, "data").returncode == 0
    results = []
    for cpus in ("0", "0,1"):
        sh(
            ["taskset", "-c", cpus, sys.executable, "-m", "pipeline", "pretrain", "--patch", "4", "--mask", "0.5"],
            tiny_repo,
            PYTHONPATH=str(tiny_repo),
        )
        results.append(json.loads((tiny_repo / "metrics" / "pretrain" / "p4-m0.5.json").read_text()))
    one, two = results
    assert one.keys() == two.keys()
    for key in ("train_loss", "val_loss", "val_mse"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=0), key


def test_missing_upstream_output_is_a_clear_error(tiny_repo):
    out = cli(tiny_repo, "probe")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "prepared file data/prepared/downstream.npz is missing" in out.stderr


def test_bench_runs_and_writes_its_table(tiny_repo):
    """`make bench` must not rot; its numbers are not asserted (a benchmark, not a timed test)."""
    assert cli(tiny_repo, "data").returncode == 0
    out = sh([sys.executable, "-m", "tools.bench", "--steps", "1", "--patches", "4,8"], tiny_repo)
    result = json.loads((tiny_repo / "bench" / "results-cpu.json").read_text())
    assert [r["what"] for r in result["rows"]] == [
        "MAE pretrain p4-m0.5",
        "MAE pretrain p8-m0.5",
        "probe epoch p8",
        "finetune epoch p8",
    ]
    assert all(r["naive_img_s"] > 0 and r["maepipe_img_s"] > 0 for r in result["rows"])
    assert result["rows"][0]["gflop_per_img"] > 0 and result["torch"] == torch.__version__
    assert "x" in out.stdout and "results-cpu.json" in out.stdout


def test_dvc_remote_round_trip_needs_no_retraining(repro_copy, tmp_path):
    """Push the repro's outputs to a folder remote; a fresh clone pulls them and is up to date."""
    repo = repro_copy
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    sh(["git", "commit", "-qm", "add a DVC remote", ".dvc/config"], repo)
    sh(["dvc", "push"], repo)
    assert any(remote.rglob("*")), "the remote is empty after dvc push"
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh(["dvc", "pull"], clone)
    assert (clone / "models" / "finetune" / "s0.pt").read_bytes() == (
        repo / "models" / "finetune" / "s0.pt"
    ).read_bytes()
    assert (clone / "data" / "prepared" / "pretrain.npz").is_file()
    assert "up to date" in sh(["dvc", "status"], clone).stdout
    out = sh(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    assert not (clone / "mlflow.db").exists(), "a pulled clone retrained something"


def test_kill_9_mid_pretrain_then_repro_finishes_with_the_same_results(repro, tmp_path):
    """SIGKILL the whole `dvc repro` (as an OOM killer or a lost node would) inside a pretrain
    cell; the next `dvc repro` finishes and every metric equals the uninterrupted run's."""
    import os
    import signal
    import subprocess

    from conftest import env

    base, _ = repro
    repo = make_repo(tmp_path / "repo", tiny_params())
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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
    for rel in [
        "metrics/select.json",
        "metrics/evaluate.json",
        *[f"metrics/pretrain/{c}.json" for c in CELLS],
        *[f"plots/pretrain/{c}.csv" for c in CELLS],
    ]:
        assert (repo / rel).read_text() == (base / rel).read_text(), rel
    assert "up to date" in sh(["dvc", "status"], repo).stdout
