"""Shared helpers: a tiny but real config, and throwaway git+DVC repos built from this checkout."""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import data
from tools import tracking_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "pipeline",
    "tools",
    "presets",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
    "data/raw/.gitignore",
]


# The only skips CI accepts: tests that need hardware a CI machine does not have.
HARDWARE_SKIPS = ("needs CUDA", "needs a machine without CUDA")


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`, what `make test` runs) each worker gets cores of its own, and the
    stages it starts inherit them, so two workers never fight over one core (runtime.setup gives a
    process one thread per core it may use)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        mine = cores[int(worker.removeprefix("gw")) % count :: count] if len(cores) >= count else cores
        os.sched_setaffinity(0, mine)
        import torch

        torch.set_num_threads(len(mine))


@contextlib.contextmanager
def _shared(tmp_path_factory, name: str):
    """A directory every xdist worker of this session shares, and a lock held while one of them
    fills it: the first to come builds, the others wait and read what it built. Yields (dir, built
    before?)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above each worker's own
    folder = root / f"shared-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            built = (folder / "done").exists()
            if not built:  # a worker that failed to build may have left half of it
                shutil.rmtree(folder)
                folder.mkdir()
            yield folder, built
            (folder / "done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MAEPIPE_NO_SKIPS=1 (`.ci/run`), a skip is a failure unless it needs other hardware:
    a test that skips quietly on a fresh machine would let CI stay green on an untested feature."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("MAEPIPE_NO_SKIPS") == "1" and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not any(h in reason for h in HARDWARE_SKIPS):
            rep.outcome = "failed"
            rep.longrepr = f"skipped where CI requires it to run (MAEPIPE_NO_SKIPS=1): {reason}"


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global torch random state, whichever tests ran before it
    (the order is random; pytest-randomly reseeds `random` and numpy, not torch)."""
    import torch

    torch.manual_seed(0)


# The tiny config's grid cells and the four downstream arms.
CELLS = ["p4-m0.5", "p4-m0.75", "p8-m0.5", "p8-m0.75"]
DOWNSTREAM = ["probe", "probe_random", "finetune", "scratch"]
# The tiny config's repetitions (pretraining run + label subset each).
REPS = [0, 1]


def tiny_params(**overrides) -> dict:
    """The committed params.yaml shrunk to seconds: digits at 16x16, a 2x2 grid, a 1-block ViT."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["device"] = "cpu"
    p["patch"] = "auto"
    p["grid"] = {"patch": [4, 8], "mask_ratio": [0.5, 0.75]}
    p["data"].update(dataset="digits", image_size=16)
    p["model"].update(dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    # mse, not the default's norm_pix: the tests read the pixel MSE every loss but norm_pix has (norm_pix
    # runs through its stage in test_stage_options.py, and through the whole default in `make run`).
    p["pretrain"].update(
        phases=[{"epochs": 2, "augment": []}], batch_size=128, train_limit=None, val_limit=None, loss="mse"
    )
    p["pretrain_full"].update(phases=[{"epochs": 2, "augment": []}], batch_size=128)
    p["repetitions"] = [0, 1]
    p["downstream"].update(labels_per_class=20, dev_fraction=0.1)
    p["probe"].update(min_steps=30, epochs=1, warmup_steps=3)
    p["finetune"].update(min_steps=20, epochs=1, warmup_steps=2, batch_size=64, augment=["shift"])
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = p
        for key in path:
            node = node[key]
        node[last] = value
    return copy.deepcopy(p)


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    e["DVC_NO_ANALYTICS"] = "1"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "maepipe test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "test@maepipe"
    e.update(extra)
    return e


def sh(cmd: list[str] | str, cwd: Path, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def make_repo(path: Path, params: dict) -> Path:
    """A fresh git repo holding this project's code and `params`, committed, as a user's clone."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = ROOT / name, path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    write_params(path, params)
    sh(["git", "init", "-q", "-b", "main"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "init"], path)
    return path


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def cli(repo: Path, *args: str, check: bool = False, **extra_env) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` in `repo`, with the repo's own copy of the code if it has one."""
    code = repo if (repo / "pipeline").is_dir() else ROOT
    return sh([sys.executable, "-m", "pipeline", *args], repo, check=check, PYTHONPATH=str(code), **extra_env)


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo", tiny_params())


@pytest.fixture(scope="session")
def repro_template(tmp_path_factory):
    """One `dvc repro` of the tiny config in a fresh git repo, committed afterwards as a user would,
    made once per session (whichever xdist worker comes first). Read it, never change it: a test
    that changes a repo takes `repro_copy`. -> (repo, the repro's stdout)."""
    with _shared(tmp_path_factory, "e2e") as (folder, built):
        repo = folder / "repo"
        if not built:
            make_repo(repo, tiny_params())
            out = sh(["dvc", "repro"], repo)
            (folder / "repro.stdout").write_text(out.stdout)
            (folder / "repro.stderr").write_text(out.stderr)  # what the user saw on stderr
            sh(["git", "add", "-A"], repo)
            sh(["git", "commit", "-qm", "repro"], repo)
    return repo, (folder / "repro.stdout").read_text()


@pytest.fixture
def repro_copy(repro_template, tmp_path) -> Path:
    """A private copy of the repo that has run (git history, DVC cache, MLflow store and all)."""
    src, _ = repro_template
    dst = tmp_path / "repo"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def pinned_template(repro_template, tmp_path_factory):
    """A copy of the template with one experiment, `pinned`: the other patch size pinned, so select,
    every pretraining run and the arms re-run and no grid cell does. Shared by the tests of pinning,
    `dvc exp show`, `dvc plots diff` and the browser; read it, never change it.
    -> (repo, the experiment's `dvc exp run` output, the pinned patch)."""
    src, _ = repro_template
    with _shared(tmp_path_factory, "pinned") as (folder, built):
        repo = folder / "repo"
        if not built:
            shutil.copytree(src, repo, symlinks=True)
            auto = json.loads((repo / "metrics" / "select.json").read_text())["repetitions"]["r0"]["cell"]
            other = 8 if auto.startswith("p4-") else 4
            out = sh(["dvc", "exp", "run", "-n", "pinned", "-S", f"patch={other}"], repo)
            (folder / "pinned.json").write_text(json.dumps({"stdout": out.stdout, "patch": other}))
    done = json.loads((folder / "pinned.json").read_text())
    return repo, done["stdout"], done["patch"]


def mlflow_runs(repo, kind: str = "stages"):
    """(client, runs) of the repo's store: the runs stages made ("stages"), the grouping runs
    (one "pipeline" parent per invocation and its "grid"), the notes for stages DVC did not run
    ("not_run"), or "all"."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maepipe")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    pick = {
        "stages": lambda t: "maepipe.level" not in t and "dvc_not_run" not in t,
        "grouping": lambda t: "maepipe.level" in t,
        "not_run": lambda t: "dvc_not_run" in t,
        "all": lambda t: True,
    }[kind]
    return client, [r for r in runs if pick(r.data.tags)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the tracking server tool's helper, the one copy."""
    return tracking_server.free_port("127.0.0.1")


# Data files in the exact on-disk formats the loaders read (MNIST-style IDX gz, CIFAR-10 pickles).


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(folder: Path, n_train=60, n_test=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": np.arange(n_train) % 10,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": np.arange(n_test) % 10,
    }
    for key, name in data.IDX_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


def write_cifar(folder: Path, per_batch=10, seed=0) -> dict:
    """The python version's layout: pickled dicts with bytes keys, data as N x 3072 uint8 rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in data.CIFAR_TRAIN + data.CIFAR_TEST:
        d = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        batches[name] = d
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in data.SPECS["cifar10"].classes]}, f, protocol=2)
    return batches
