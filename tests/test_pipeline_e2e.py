"""The real thing on a tiny config: `dvc repro`, `dvc exp run -S ...`, queued experiments,
`dvc plots diff`, and the MLflow store they leave behind. No mocks."""

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import CELLS, DOWNSTREAM, REPS, cli, free_port, mlflow_runs, sh, tiny_params, write_params


@pytest.fixture
def repro(repro_template):
    return repro_template


def _json(repo, rel):
    return json.loads((repo / rel).read_text())


def _csv(repo, rel):
    import csv

    with open(repo / rel) as f:
        return list(csv.DictReader(f))


def _reps(repo):
    from pipeline import repetition

    return repetition.load(repo / "data" / "repetitions.json")


def test_repro_runs_every_stage_and_writes_grid_outputs(repro):
    repo, log = repro
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    expected = {"validate", "data", "budget", "select", "evaluate", *DOWNSTREAM} | {
        f"pretrain@{c[1:].replace('-m', '-')}" for c in CELLS
    }
    assert set(lock) == expected | {f"pretrain_full@{k}" for k in REPS}
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


def test_every_repetition_draws_its_own_budget_once(repro):
    repo, _ = repro
    from pipeline import prepared

    y = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")["y_train"]
    reps = _reps(repo)
    assert [(r.k, r.seed) for r in reps] == [(0, 0), (1, 1000)]
    for r in reps:
        assert np.bincount(y[r.train], minlength=10).tolist() == [18] * 10  # 20 per class, 2 held out
        assert np.bincount(y[r.dev], minlength=10).tolist() == [2] * 10
    assert not np.array_equal(reps[0].budget, reps[1].budget)


def test_select_chooses_per_repetition_on_its_own_budget(repro):
    repo, _ = repro
    sel = _json(repo, "metrics/select.json")
    grid = _csv(repo, "plots/select/grid.csv")
    assert [r["cell"] for r in grid] == CELLS
    for k in REPS:
        # Default select.metric is knn_acc: the highest of this repetition's scores, ties to the
        # larger patch then the smaller ratio.
        score = {r["cell"]: float(r[f"knn_acc_r{k}"]) for r in grid}
        top = max(score.values())
        expected = sorted((c for c in CELLS if score[c] == top), key=lambda c: (-int(c[1:].split("-")[0]), c))[0]
        assert sel["repetitions"][f"r{k}"]["cell"] == expected and sel["metric"] == "knn_acc"
        assert sel["repetitions"][f"r{k}"]["labels_used"] == 200  # the whole budget, train and dev
        chosen = _json(repo, f"models/selection/r{k}.json")
        assert chosen == {"cell": expected, "patch": int(expected[1]), "mask_ratio": float(expected.split("-m")[1])}
        assert f"r{k}" in next(r for r in grid if r["cell"] == expected)["chosen_by"]
    for r in grid:
        assert float(r["knn_acc"]) == pytest.approx(np.mean([float(r[f"knn_acc_r{k}"]) for k in REPS]))
    assert sel["cells"] == ",".join(sel["repetitions"][f"r{k}"]["cell"] for k in REPS)
    # The pixels and random-encoder floors are scored the same way; pixels classify digits well.
    assert set(sel["floors"]) == {"random encoder, patch 4", "random encoder, patch 8", "raw pixels (PCA to 32)"}
    assert sel["floors"]["raw pixels (PCA to 32)"]["knn_acc"] > 0.6
    from scipy.stats import spearmanr

    rho = spearmanr([-float(r["val_mse"]) for r in grid], [float(r["probe_acc"]) for r in grid]).statistic
    assert sel["spearman_val_mse_vs_probe_acc"] == pytest.approx(rho)
    report = (repo / "reports" / "grid.md").read_text()
    assert "## Floors" in report and "| mask_ratio |" in report and "chosen_by" in report


def test_each_repetition_is_its_own_pretraining_run(repro):
    repo, _ = repro
    sel = _json(repo, "metrics/select.json")
    runs = [_json(repo, f"metrics/pretrain_full/r{k}.json") for k in REPS]
    for k, full in zip(REPS, runs):
        assert full["cell"] == sel["repetitions"][f"r{k}"]["cell"] and full["repetition"] == k
        assert full["train_images"] == 1294 and full["steps"] == 2 * (1294 // 128)
        curve = _csv(repo, f"plots/pretrain_full/r{k}.csv")
        assert float(curve[-1]["val_loss"]) < float(curve[0]["val_loss"])  # it learns
        for kind in ("recon", "curve"):
            assert (repo / "plots" / "images" / "pretrain_full" / f"r{k}-{kind}.png").stat().st_size > 1000
    # Fresh runs from their own seeds, not one run copied: same cell, different numbers.
    if runs[0]["cell"] == runs[1]["cell"]:
        assert runs[0]["train_loss"] != runs[1]["train_loss"]
    from pipeline import checkpoint

    grid = checkpoint.load(repo / "models" / "mae" / f"{runs[0]['cell']}.pt")["state_dict"]
    full = checkpoint.load(repo / "models" / "encoder" / "r0.pt")["state_dict"]
    assert not torch.equal(grid["encoder.patch_embed.weight"], full["encoder.patch_embed.weight"])


def test_downstream_arms_repeat_per_repetition_on_its_training_labels(repro):
    repo, _ = repro
    reps = _reps(repo)
    for arm in DOWNSTREAM:
        m = _json(repo, f"metrics/{arm}.json")
        assert [(r["repetition"], r["seed"]) for r in m["repetitions"]] == [(0, 0), (1, 1000)]
        assert all(r["labels"] == 180 for r in m["repetitions"])
        accs = [r["val_acc"] for r in m["repetitions"]]
        assert m["val_acc_mean"] == pytest.approx(sum(accs) / 2)
        assert all(0 <= r["dev_acc"] <= 1 for r in m["repetitions"])
        assert [p.name for p in sorted((repo / "models" / arm).iterdir())] == ["r0.pt", "r1.pt"]
        curve = _csv(repo, f"plots/{arm}/curve.csv")
        # One rule: max(min_steps, epochs x 180 labels / batch) = 30 (probe) and 20 (fine-tune).
        steps = 30 if arm.startswith("probe") else 20
        assert int(curve[-1]["step"]) == steps and len(curve) == 10
        assert float(curve[-1]["val_acc"]) == pytest.approx(m["val_acc_mean"], rel=1e-5)
    # The dev accuracy each arm records is its classifier's on its repetition's dev labels.
    from pipeline import checkpoint, prepared

    d = prepared.load_prepared(repo / "data" / "prepared" / "downstream.npz")
    for rep in reps:
        ckpt = checkpoint.load(repo / "models" / "finetune" / f"r{rep.k}.pt")
        clf = checkpoint.build_classifier(ckpt).eval()
        with torch.no_grad():
            pred = clf(torch.as_tensor(d["x_train"][rep.dev]).float() / 255.0).argmax(1).numpy()
        assert ckpt["meta"]["dev_acc"] == pytest.approx(float((pred == d["y_train"][rep.dev]).mean()))
    # The frozen MAE features beat chance (0.1) by far even on this tiny config.
    assert _json(repo, "metrics/probe.json")["val_acc_mean"] > 0.25


def test_evaluate_is_recomputable_from_the_committed_predictions(repro):
    """Every accuracy and every paired interval in evaluate.json follows from predictions.csv."""
    from pipeline import stats

    repo, _ = repro
    ev = _json(repo, "metrics/evaluate.json")
    rows = _csv(repo, "plots/evaluate/predictions.csv")
    assert len(rows) == ev["test_images"] == 359 and ev["labels"] == 180 and ev["dev_labels"] == 20
    assert [r["k"] for r in ev["repetitions"]] == REPS and ev["pretraining_runs"] == 2
    label = np.array([int(r["label"]) for r in rows])
    correct = {}
    for arm in (*DOWNSTREAM, "pixels_logreg"):
        pred = np.array([[int(r[f"{arm}_r{k}"]) for r in rows] for k in REPS])
        correct[arm] = pred == label[None]
        accs = correct[arm].mean(1)
        assert [s["accuracy"] for s in ev["arms"][arm]["repetitions"]] == pytest.approx(list(accs))
        assert ev["arms"][arm]["accuracy_mean"] == pytest.approx(accs.mean())
        assert ev["arms"][arm]["accuracy_sd"] == pytest.approx(accs.std(ddof=1))
        assert len(ev["arms"][arm]["auc_per_class"]) == 10
    assert ev["arms"]["pixels_logreg"]["accuracy_mean"] > 0.8  # the floor is a real classifier
    assert all(c in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0) for c in ev["arms"]["pixels_logreg"]["C"])
    for a, b in (("finetune", "scratch"), ("probe", "probe_random"), ("finetune", "pixels_logreg")):
        c = ev["comparisons"][f"{a}-{b}"]
        again = stats.paired_bootstrap(correct[a], correct[b], seed=0)
        assert c["diff"] == pytest.approx(correct[a].mean() - correct[b].mean())
        assert (c["ci_low"], c["ci_high"]) == pytest.approx((again["ci_low"], again["ci_high"]))
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
        per_rep = correct[a].mean(1) - correct[b].mean(1)
        assert c["per_repetition"] == pytest.approx(list(per_rep)) and c["sd"] == pytest.approx(per_rep.std(ddof=1))
        assert c["mcnemar_p"] == pytest.approx([stats.mcnemar(correct[a][k], correct[b][k])["p"] for k in REPS])
    for arm in (*DOWNSTREAM, "pixels_logreg"):
        roc = (repo / "plots" / "evaluate" / f"roc_{arm}.csv").read_text().splitlines()
        assert roc[0].startswith("fpr,0,1,") and roc[0].endswith(",micro") and roc[-1].startswith("1,1,1")
        confusion = _csv(repo, f"plots/evaluate/confusion_{arm}.csv")
        assert len(confusion) == 359
        assert [int(r["predicted"]) for r in confusion] == [int(r[f"{arm}_r0"]) for r in rows]
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
    assert all(f"| {m} |" in table for m in DOWNSTREAM) and "| finetune-pixels_logreg |" in table
    summary = _json(repo, "metrics/summary.json")
    assert summary["reps"] == 2 and summary["ft-pixels"] == round(
        100 * ev["comparisons"]["finetune-pixels_logreg"]["diff"], 2
    )


def test_small_results_are_in_git_and_artefacts_are_not(repro):
    repo, _ = repro
    tracked = sh(["git", "ls-files"], repo).stdout.split()
    assert {"metrics/select.json", "plots/pretrain/p4-m0.5.csv", "plots/evaluate/predictions.csv"} <= set(tracked)
    # data/raw's README and .gitignore are the project's own (the folder a user's images go in).
    kept = ("data/raw/README.md", "data/raw/.gitignore")
    assert not [f for f in tracked if (f.startswith(("models/", "data/")) and f not in kept) or f == "mlflow.db"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout


def test_mlflow_store_has_one_run_per_stage(repro):
    repo, _ = repro
    client, runs = mlflow_runs(repo)
    names = sorted(r.info.run_name for r in runs)
    sel = _json(repo, "metrics/select.json")
    cells = [sel["repetitions"][f"r{k}"]["cell"] for k in REPS]
    arms_cell = ",".join(sorted(set(cells)))
    # The controls are named by the architecture they copy (the patch size), not by a cell.
    patches = ",".join(sorted({c.split("-")[0] for c in cells}))
    assert names == sorted(
        ["data", f"select-{sel['cells']}", "evaluate"]
        + [f"pretrain_full-r{k}-{c}" for k, c in zip(REPS, cells)]
        + [f"pretrain-{c}" for c in CELLS]
        + [f"{arm}-{arms_cell}" for arm in ("probe", "finetune")]
        + [f"{arm}-{patches}" for arm in ("probe_random", "scratch")]
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
    full = next(r for r in runs if r.info.run_name.startswith("pretrain_full-r1-"))
    assert full.data.params["repetition"] == "1" and full.data.params["repetition_seed"] == "1000"
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
    assert [m.step for m in client.get_metric_history(ft.info.run_id, "val_acc_r1")] == list(range(2, 22, 2))


def test_runs_are_grouped_under_one_parent_per_invocation(repro):
    """One `dvc repro`: one parent run showing the selected cells and the summary, a `grid` run
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
    # The parent spans the invocation, from its first stage's start to its last stage's end, and
    # carries every value of params.yaml under the names the stages log them with.
    parent = client.get_run(top[0].info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(r.info.start_time for r in runs)
    assert parent.info.end_time >= max(r.info.end_time for r in runs)
    assert parent.data.params["finetune.min_steps"] == "20" and parent.data.params["repetitions"] == "[0, 1]"
    assert parent.data.params["pretrain.phases"] == "2xnone" and parent.data.params["data.dataset"] == "digits"
    # The experiment is marked as model training, so the UI opens it on its runs.
    exp = client.get_experiment_by_name("maepipe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_prints_its_own_lines_and_no_librarys(repro, tiny_repo):
    """Quiet by default: the tiny `dvc repro` left nothing on stderr (no MLflow INFO line, warning
    or download bar); MAEPIPE_VERBOSE=1 brings MLflow's lines back."""
    repo, log = repro
    assert (repo.parent / "repro.stderr").read_text().strip() == ""
    assert "select: repetition 0 takes" in log and "evaluate: finetune-scratch" in log
    assert "finetune: val accuracy" in log and "pretrain p4-m0.5 epoch 2/2:" in log
    quiet, verbose = cli(tiny_repo, "data"), cli(tiny_repo, "data", MAEPIPE_VERBOSE="1")
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr.strip() == "" and "INFO mlflow" in verbose.stderr


def test_pinning_a_cell_reruns_only_what_depends_on_it(pinned_template):
    repo, stdout, other = pinned_template
    ran = [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage")]
    # The pin changes which cell every repetition pretrains and fine-tunes; the controls copy its
    # architecture; the budget and no grid cell re-run.
    assert ran[:2] == ["validate", "select"] and ran[-1] == "evaluate", stdout
    assert sorted(ran[2:-1]) == sorted([*DOWNSTREAM, *(f"pretrain_full@{k}" for k in REPS)]), stdout
    assert all(f"Stage 'pretrain@{c[1:].replace('-m', '-')}' didn't change, skipping" in stdout for c in CELLS)
    sel = json.loads((repo / "metrics" / "select.json").read_text())
    assert all(sel["repetitions"][f"r{k}"]["cell"].startswith(f"p{other}-") for k in REPS)
    show = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = [e for rev in show for e in (rev.get("experiments") or [])]
    assert any(e.get("name") == "pinned" for e in exps)
    diff = sh(["dvc", "metrics", "diff", "--json"], repo).stdout
    assert "metrics/select.json" in diff
    # The runs of the experiment are in the store, tagged with its name.
    _, runs = mlflow_runs(repo)
    tagged = sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("dvc_exp") == "pinned")
    assert tagged == sorted(["evaluate", "select", *["pretrain_full"] * len(REPS), *DOWNSTREAM])
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


def test_a_budget_that_keeps_every_choice_retrains_no_encoder(repro_copy):
    """The label budget changes what select reads, not necessarily what it chooses: each
    repetition's choice is its own small file, so a pretraining run re-runs only when its
    repetition's cell changed."""
    repo = repro_copy
    before = {k: _json(repo, f"models/selection/r{k}.json") for k in REPS}
    write_params(repo, tiny_params(**{"downstream.labels_per_class": 19}))
    out = sh(["dvc", "repro"], repo).stdout
    for k in REPS:
        kept = _json(repo, f"models/selection/r{k}.json") == before[k]
        assert (f"Stage 'pretrain_full@{k}' didn't change, skipping" in out) == kept, out
        assert (f"Running stage 'pretrain_full@{k}'" in out) == (not kept), out
    assert "Running stage 'budget'" in out and "Running stage 'finetune'" in out


def test_plots_diff_renders_between_revisions(pinned_template, tmp_path):
    """`dvc plots diff` of the committed run against an experiment: every declared plot renders
    for both revisions, with no error."""
    repo, _, _ = pinned_template
    result = json.loads(sh(["dvc", "plots", "diff", "HEAD", "pinned", "--json"], repo).stdout)
    assert not result.get("errors"), result.get("errors")
    data = result["data"]
    for name in (
        "plots/finetune/curve.csv",
        "plots/evaluate/roc_scratch.csv",
        "plots/pretrain/p4-m0.5.csv",
        "plots/pretrain_full/r1.csv",
    ):
        revisions = {r for plot in data[name] for r in plot.get("revisions", [])}
        assert revisions == {"HEAD", "pinned"}, (name, revisions)
    out_dir = tmp_path / "plots_html"
    sh(["dvc", "plots", "diff", "HEAD", "pinned", "-o", str(out_dir)], repo)
    html = (out_dir / "index.html").read_text()
    for name in (
        "roc_finetune.csv",
        "roc_scratch.csv",
        "confusion_probe.csv",
        "p4-m0.5.csv",
        "knn_acc.png",
        "ROC (micro-average",
        "pretrained vs from scratch",
        "r0-recon.png",
        "pinned",
    ):
        assert name in html, name


def test_unreachable_tracking_server_is_one_clear_error(tiny_repo):
    uri = f"http://127.0.0.1:{free_port()}"
    out = cli(tiny_repo, "data", MLFLOW_TRACKING_URI=uri)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert f"MLFLOW_TRACKING_URI = {uri} cannot be reached" in out.stderr
    assert not (tiny_repo / "data" / "prepared").exists()


def test_a_stopped_tracking_server_changes_nothing(repro_copy):
    """A repo that has run, MLFLOW_TRACKING_URI pointing at a server that is down: `dvc repro` of a
    stage (whose outputs DVC removes before running it) and `dvc exp run` of the whole pipeline
    each stop with one line, and git and DVC find the workspace as it was."""
    repo = repro_copy
    dead = f"http://127.0.0.1:{free_port()}"
    for cmd in (
        ["dvc", "repro", "-f", "-s", "probe"],
        ["dvc", "repro", "-f", "-s", "pretrain@8-0.5"],
        ["dvc", "exp", "run", "-f"],
    ):
        out = sh(cmd, repo, check=False, MLFLOW_TRACKING_URI=dead)
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if line.startswith("maepipe: error:")]
        assert out.returncode != 0 and len(errors) == 1 and "cannot be reached" in errors[0], (cmd, text)
        assert "Traceback" not in text, text
        assert sh(["git", "status", "--porcelain"], repo).stdout == "", cmd
        assert "up to date" in sh(["dvc", "status"], repo).stdout, cmd


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
    # The printed table carries every row's measured ratio, and names the file it wrote.
    for r in result["rows"]:
        line = next(x for x in out.stdout.splitlines() if x.startswith(r["what"]))
        assert f"x{r['ratio']:.2f}" in line and r["ratio"] == pytest.approx(r["maepipe_img_s"] / r["naive_img_s"])
    assert "results-cpu.json" in out.stdout


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
    for rel in ("models/finetune/r0.pt", "models/encoder/r1.pt", "data/repetitions.json"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert (clone / "data" / "prepared" / "pretrain.npz").is_file()
    assert "up to date" in sh(["dvc", "status"], clone).stdout
    out = sh(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    assert not (clone / "mlflow.db").exists(), "a pulled clone retrained something"


def _kill_during(repo, cmd: list[str], line_start: str, occurrence: int = 1) -> list[str]:
    """Run `cmd` and SIGKILL its whole process group (as an OOM killer or a lost node would) when
    the `occurrence`-th line starting with `line_start` appears; -> the lines seen."""
    import os
    import signal
    import subprocess

    from conftest import env

    proc = subprocess.Popen(
        cmd, cwd=repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(line_start):
                occurrence -= 1
                if occurrence == 0:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return seen


def test_kill_9_mid_grid_cell_resumes_and_ends_with_the_uninterrupted_bytes(repro_copy, repro):
    """A grid cell killed after its first epoch of two: the next run of the stage says where it
    resumes, trains only the second epoch, and writes the uninterrupted run's exact bytes."""
    base, _ = repro
    repo = repro_copy
    _kill_during(repo, ["dvc", "repro", "-f", "-s", "pretrain@4-0.75"], "pretrain p4-m0.75 epoch 1/2")
    # DVC removed the cell's outputs before running it; nothing half-written took their place.
    assert not (repo / "metrics" / "pretrain" / "p4-m0.75.json").exists()
    assert not list((repo / "models").rglob(".*tmp*"))
    out = sh(["dvc", "repro", "-f", "-s", "pretrain@4-0.75"], repo).stdout
    assert "pretrain p4-m0.75: resuming after epoch 1/2" in out, out
    assert "pretrain p4-m0.75 epoch 2/2" in out and "pretrain p4-m0.75 epoch 1/2" not in out, out
    for rel in ("models/mae/p4-m0.75.pt", "metrics/pretrain/p4-m0.75.json", "plots/pretrain/p4-m0.75.csv"):
        assert (repo / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert not list((repo / ".maepipe" / "resume").iterdir())  # cleared once the outputs are written
    assert "up to date" in sh(["dvc", "status"], repo).stdout


def test_kill_9_mid_finetune_resumes_the_repetition_it_was_in(repro_copy, repro):
    """The fine-tune killed half-way through its second repetition: the next run keeps the first
    (finished before the kill, though DVC removed its checkpoint), resumes the second at its last
    validation, and both checkpoints equal the uninterrupted run's byte for byte."""
    base, _ = repro
    repo = repro_copy
    _kill_during(repo, ["dvc", "repro", "-f", "-s", "finetune"], "finetune step 10/20", occurrence=2)
    out = sh(["dvc", "repro", "-f", "-s", "finetune"], repo).stdout
    assert "finetune: resuming after step 20/20" in out and "finetune: resuming after step 10/20" in out, out
    assert out.count("finetune step 12/20") == 1, out  # only the second repetition's rest trained
    for rel in ("models/finetune/r0.pt", "models/finetune/r1.pt", "metrics/finetune.json", "plots/finetune/curve.csv"):
        assert (repo / rel).read_bytes() == (base / rel).read_bytes(), rel
    # A changed param is another run: its state is not resumed.
    _kill_during(repo, ["dvc", "repro", "-f", "-s", "finetune"], "finetune step 10/20")
    write_params(repo, tiny_params(**{"finetune.lr_head": 1e-3}))
    out = sh(["dvc", "repro", "-s", "finetune"], repo).stdout
    assert "resuming" not in out and len(list((repo / ".maepipe" / "resume").iterdir())) == 0, out
