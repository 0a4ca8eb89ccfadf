"""DVC as a team uses it: models fetched by name (`dvc artifacts get`), the grid split across
machines through a shared remote and its run cache, and an experiments table that fits a screen."""

import json
import re
import shutil
import sys

import pytest
import yaml
from conftest import ROOT, make_repo, sh, tiny_params

CELLS = {"a": ["pretrain@4-0.5", "pretrain@4-0.75"], "b": ["pretrain@8-0.5", "pretrain@8-0.75"]}
# The README's line for `dvc exp show` (section "Pinning a cell, label budgets, experiments").
EXP_SHOW = [
    "dvc",
    "exp",
    "show",
    "--no-pager",
    "--drop",
    ".*",
    "--keep",
    "(Experiment|encoder|budget|reps|finetune|scratch|probe|pixels|ft-scratch|ft-scratch_ci"
    "|ft-pixels|ft-pixels_ci|probe-rand|probe-rand_ci)$",
]


def test_models_are_fetched_by_name_from_a_clone(repro_copy, tmp_path):
    """A version of each artifact is registered (GTO's git tags, as the README says), then fetched
    by name from outside the repository."""
    repo = repro_copy
    from pipeline import checkpoint

    for name in ("mae-encoder", "finetuned-classifier"):
        sh(["gto", "register", name], repo)
    assert {"mae-encoder@v0.0.1", "finetuned-classifier@v0.0.1"} <= set(sh(["git", "tag"], repo).stdout.split())
    sh(["dvc", "artifacts", "get", str(repo), "mae-encoder", "-o", "encoders"], tmp_path)
    sel = json.loads((repo / "metrics" / "select.json").read_text())["repetitions"]
    assert sorted(p.name for p in (tmp_path / "encoders").iterdir()) == ["r0.pt", "r1.pt"]
    for k in (0, 1):
        got = tmp_path / "encoders" / f"r{k}.pt"
        assert got.read_bytes() == (repo / "models" / "encoder" / f"r{k}.pt").read_bytes()
        assert checkpoint.load(got)["meta"]["cell"] == sel[f"r{k}"]["cell"]
    sh(["dvc", "artifacts", "get", str(repo), "finetuned-classifier", "--rev", "v0.0.1", "-o", "classifier"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "classifier").iterdir()) == ["r0.pt", "r1.pt"]
    clf = checkpoint.build_classifier(checkpoint.load(tmp_path / "classifier" / "r0.pt"))
    assert clf.head[-1].out_features == 10


def test_grid_split_across_two_machines_trains_no_cell_again(tmp_path):
    """Machines a and b each train half the grid, push the models to one folder remote and commit
    their results (dvc.lock, metrics, curves, figures) to a branch; a third clone merges both
    branches (tools/merge_dvc_lock.py joins the two dvc.lock files), pulls, and `dvc repro` trains
    no cell. This is the README's recipe, step by step."""
    # One repetition: what is shared is the grid; downstream of it one pretraining run says as much.
    origin = make_repo(tmp_path / "origin", tiny_params(repetitions=[0]))
    shutil.copy2(ROOT / ".gitattributes", origin / ".gitattributes")  # tools/ comes with the project files
    sh(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], origin)
    sh(["git", "add", "-A"], origin)
    sh(["git", "commit", "-qm", "a shared DVC remote"], origin)
    sh(["git", "config", "receive.denyCurrentBranch", "ignore"], origin)
    trained = {}
    for machine, stages in CELLS.items():
        clone = tmp_path / machine
        sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
        out = sh(["dvc", "repro", *stages], clone).stdout
        assert sorted(re.findall(r"Running stage '(pretrain@[^']+)'", out)) == sorted(stages)
        sh(["dvc", "push"], clone)
        sh(["git", "add", "dvc.lock", "metrics", "plots"], clone)
        sh(["git", "commit", "-qm", f"grid cells of machine {machine}"], clone)
        sh(["git", "push", "-q", "origin", f"HEAD:cells-{machine}"], clone)
        for stage in stages:
            cell = "p" + stage.split("@")[1].replace("-", "-m")
            trained[cell] = (clone / "metrics" / "pretrain" / f"{cell}.json").read_text()
    third = tmp_path / "c"
    sh(["git", "clone", "-q", str(origin), str(third)], tmp_path)
    sh(["git", "config", "merge.dvc-lock.driver", f"{sys.executable} tools/merge_dvc_lock.py %O %A %B"], third)
    for branch in ("cells-a", "cells-b"):  # one at a time: git's octopus merge runs no merge driver
        sh(["git", "pull", "-q", "--no-rebase", "--no-edit", "origin", branch], third)
    sh(["dvc", "pull", "--allow-missing"], third)  # the stages after the grid have not run anywhere
    out = sh(["dvc", "repro"], third).stdout
    assert not re.findall(r"Running stage 'pretrain@", out), out
    for stage in (*CELLS["a"], *CELLS["b"]):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage 'select'" in out and "Running stage 'evaluate'" in out
    for cell, metrics in trained.items():
        assert (third / "metrics" / "pretrain" / f"{cell}.json").read_text() == metrics
    assert "up to date" in sh(["dvc", "status"], third).stdout


def test_the_lock_merge_is_three_way_by_stage(tmp_path):
    """Against the common ancestor: one side's addition, change or deletion of a stage wins; a
    stage both sides changed differently is refused by name. Also as git runs it (%O %A %B)."""
    import subprocess

    sys.path.insert(0, str(ROOT / "tools"))
    import merge_dvc_lock

    def lock(**stages):
        return {"schema": "2.0", "stages": {k.replace("_", "@"): {"cmd": v} for k, v in stages.items()}}

    base = lock(data="x", select="s", probe="p")
    ours = lock(data="x", select="s2", probe="p", pretrain_4="a")  # changed select, added a cell
    theirs = lock(data="x", select="s", pretrain_8="b")  # deleted probe, added another cell
    merged = merge_dvc_lock.merge(base, ours, theirs)["stages"]
    assert merged == {
        "data": {"cmd": "x"},
        "select": {"cmd": "s2"},
        "pretrain@4": {"cmd": "a"},
        "pretrain@8": {"cmd": "b"},
    }
    # The same change on both sides is no conflict; different changes are.
    assert merge_dvc_lock.merge(base, ours, ours)["stages"] == ours["stages"]
    with pytest.raises(SystemExit, match="stage select changed differently"):
        merge_dvc_lock.merge(base, ours, lock(data="x", select="s3", probe="p"))
    paths = []
    for name, content in (("O", base), ("A", ours), ("B", theirs)):
        paths.append(tmp_path / name)
        paths[-1].write_text(yaml.safe_dump(content))
    subprocess.run([sys.executable, str(ROOT / "tools" / "merge_dvc_lock.py"), *map(str, paths)], check=True)
    assert yaml.safe_load(paths[1].read_text())["stages"] == merged


def test_the_documented_exp_show_line_fits_200_columns(pinned_template):
    repo, _, _ = pinned_template
    full = sh(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout.splitlines()[0].split(",")
    out = sh(EXP_SHOW, repo, COLUMNS="1000").stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 200, out
    assert "pinned" in out and "ft-scratch_ci" in out and "ft-pixels_ci" in out and "budget" in out
    # What this line keeps: every column of metrics/summary.json, and a fifth of all columns at most.
    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    kept = sh([*EXP_SHOW, "--csv"], repo).stdout.splitlines()[0].split(",")
    assert set(summary) <= set(kept) and len(kept) < len(full) / 5, (kept, len(full))
