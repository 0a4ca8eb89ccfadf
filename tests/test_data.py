"""Loaders on files written in the exact on-disk formats (IDX gz, CIFAR-10 python pickles)."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, tiny_params, write_cifar, write_idx, write_idx_dataset, write_params

from pipeline import data, prepared
from pipeline.errors import UserError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_idx_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", a)
    assert np.array_equal(data.read_idx(tmp_path / "x.gz"), a)


def test_idx_corrupt(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((5, 4, 4)))
    raw = gzip.open(tmp_path / "x.gz").read()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-3])
    with pytest.raises(UserError, match="corrupt .*IDX header says"):
        data.read_idx(tmp_path / "short.gz")
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="not a readable gzip"):
        data.read_idx(tmp_path / "plain.gz")
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + raw[4:])  # float IDX, not ubyte
    with pytest.raises(UserError, match="not an unsigned-byte IDX"):
        data.read_idx(tmp_path / "magic.gz")


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_idx_datasets_from_local_folder(tmp_path, dataset):
    arrays = write_idx_dataset(tmp_path / dataset)
    out = data.prepare(dataset, 28, 0.25, 0, tmp_path, verify_checksums=False, download=False)
    assert out["x_train"].shape == (45, 1, 28, 28) and out["x_val"].shape == (15, 1, 28, 28)
    assert out["x_test"].dtype == np.uint8 and np.array_equal(out["x_test"][:, 0], arrays["test_images"])
    # train + val is a permutation of the original training set
    both = np.concatenate([out["x_train"], out["x_val"]])[:, 0].reshape(60, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, arrays["train_images"].astype(np.uint8).reshape(60, -1)))
    assert list(out["classes"]) == list(data.SPECS[dataset].classes)


def test_torchvision_layout_is_found(tmp_path):
    """Where torchvision's download puts the files: <raw>/<dataset>/MNIST/raw/."""
    write_idx_dataset(tmp_path / "mnist" / "MNIST" / "raw")
    assert data.locate(data.SPECS["mnist"], tmp_path, download=False) == tmp_path / "mnist" / "MNIST" / "raw"


def test_checksums_reject_a_foreign_file(tmp_path):
    write_idx_dataset(tmp_path / "mnist")
    with pytest.raises(UserError, match="fails its checksum"):
        data.prepare("mnist", 28, 0.25, 0, tmp_path, verify_checksums=True, download=False)


def test_cifar10_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    out = data.prepare("cifar10", 32, 0.2, 0, tmp_path, verify_checksums=False, download=False)
    assert out["x_train"].shape == (40, 3, 32, 32) and out["x_test"].shape == (10, 3, 32, 32)
    first = batches["test_batch"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(out["x_test"][0], first)
    assert out["y_test"].tolist() == batches["test_batch"][b"labels"]
    assert out["mean"].shape == (3,)
    resized = data.prepare("cifar10", 28, 0.2, 0, tmp_path, verify_checksums=False, download=False)
    assert resized["x_train"].shape == (40, 3, 28, 28)


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Boom(), b"labels": [1]}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load (__builtin__|builtins).print"):
        data.read_cifar_batch(folder / "data_batch_1")


def test_digits_split_is_seeded_and_disjoint():
    a = data.prepare("digits", 8, 0.1, 0, Path("unused"))
    b = data.prepare("digits", 8, 0.1, 0, Path("unused"))
    c = data.prepare("digits", 8, 0.1, 1, Path("unused"))
    assert all(np.array_equal(a[k], b[k]) for k in prepared.PREPARED_KEYS)
    assert not np.array_equal(a["y_val"], c["y_val"])
    n = sum(len(a[f"y_{s}"]) for s in ("train", "val", "test"))
    assert n == 1797 and len(a["y_test"]) == 359
    rows = {bytes(x) for s in ("train", "val", "test") for x in a[f"x_{s}"].reshape(len(a[f"x_{s}"]), -1)}
    assert len(rows) > 1700  # (digits has a few duplicate images of its own)
    up = data.prepare("digits", 16, 0.1, 0, Path("unused"))
    assert up["x_train"].shape[1:] == (1, 16, 16) and up["x_train"].max() > 200


def test_missing_dataset_says_where_to_put_files(tmp_path):
    with pytest.raises(UserError) as e:
        data.prepare("mnist", 28, 0.1, 0, tmp_path / "raw", download=False)
    msg = str(e.value)
    assert "cannot obtain mnist" in msg and str(tmp_path / "raw" / "mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_prepared_file_roundtrip_and_corruption(tmp_path):
    arrays = data.prepare("digits", 8, 0.1, 0, Path("unused"))
    path = tmp_path / "prepared" / "digits.npz"
    prepared.save_prepared(arrays, path)
    back = prepared.load_prepared(path)
    assert all(np.array_equal(arrays[k], back[k]) for k in prepared.PREPARED_KEYS)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="is corrupt"):
        prepared.load_prepared(path)
    with pytest.raises(UserError, match="is missing"):
        prepared.load_prepared(tmp_path / "nope.npz")


def test_data_stage_on_a_corrupt_local_copy_writes_nothing(tmp_path):
    write_idx_dataset(tmp_path / "data" / "raw" / "mnist")
    (tmp_path / "data" / "raw" / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    write_params(tmp_path, tiny_params(**{"data.dataset": "mnist", "data.verify_checksums": False}))
    out = cli(tmp_path, "data")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("maepipe: error: data: ")
    assert "corrupt" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_checksum_of_a_corrupt_gzip_is_a_clear_error(tmp_path):
    write_idx_dataset(tmp_path / "fashion_mnist")
    (tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(UserError, match="is corrupt"):
        data.prepare("fashion_mnist", 28, 0.25, 0, tmp_path, verify_checksums=True, download=False)


def test_labels_out_of_range_are_corrupt(tmp_path):
    arrays = write_idx_dataset(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / data.IDX_FILES["test_labels"], arrays["test_labels"] + 5)
    with pytest.raises(UserError, match="test labels run from 5 to 14; expected 0..9"):
        data.prepare("mnist", 28, 0.25, 0, tmp_path, verify_checksums=False, download=False)


@pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian_passes_checksums(tmp_path):
    spec = data.SPECS["fashion_mnist"]
    assert data.locate(spec, tmp_path, download=False) == DEBIAN_FASHION
    data.verify(spec, DEBIAN_FASHION, list(data.IDX_FILES.values()))
    labels = data.read_idx(DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_label_budget_is_class_balanced_seeded_and_a_subset():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    a = prepared.label_budget(labels, 30, 7, [str(c) for c in range(10)])
    assert len(a) == 300 and len(set(a.tolist())) == 300
    assert np.bincount(labels[a], minlength=10).tolist() == [30] * 10
    assert np.array_equal(a, prepared.label_budget(labels, 30, 7, [str(c) for c in range(10)]))
    b = prepared.label_budget(labels, 30, 8, [str(c) for c in range(10)])
    assert not np.array_equal(a, b)
    # A larger budget of the same seed is not required to contain the smaller one, but "all" is all.
    assert np.array_equal(prepared.label_budget(labels, "all", 7, list("0123456789")), np.arange(5000))


def test_label_budget_larger_than_a_class_is_one_clear_error():
    labels = np.array([0] * 5 + [1] * 3)
    with pytest.raises(UserError, match=r"labels_per_class = 4: class 'b' has only 3 training images"):
        prepared.label_budget(labels, 4, 0, ["a", "b"])


def test_repetitions_split_each_budget_into_train_and_dev(tmp_path):
    from pipeline import repetition

    labels = np.random.default_rng(0).integers(0, 10, 5000)
    classes = [str(c) for c in range(10)]
    reps = repetition.draw(labels, classes, 30, 0.1, 5, [0, 2])
    assert [(r.k, r.seed) for r in reps] == [(0, 5), (2, 2005)]
    for r in reps:
        # The budget is exactly the label subset the seed draws; dev holds 3 of each class's 30.
        assert np.array_equal(r.budget, prepared.label_budget(labels, 30, r.seed, classes))
        assert not set(r.train) & set(r.dev)
        assert np.bincount(labels[r.dev], minlength=10).tolist() == [3] * 10
        assert np.bincount(labels[r.train], minlength=10).tolist() == [27] * 10
    assert not np.array_equal(reps[0].budget, reps[1].budget)
    # Saved and loaded as written; a file drawn for other params is refused.
    key = {"seed": 5, "labels": 30}
    repetition.save(reps, key, tmp_path / "r.json")
    back = repetition.load(tmp_path / "r.json", key)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.dev, b.dev) for a, b in zip(reps, back))
    with pytest.raises(UserError, match="was drawn for other params"):
        repetition.load(tmp_path / "r.json", {"seed": 6, "labels": 30})
    with pytest.raises(UserError, match="dev_fraction = 0.5: class '0' has 1 budget labels"):
        repetition.draw(labels, classes, 1, 0.5, 0, [0])


def test_gray_and_rgb_modes_match_pil():
    """A built-in read in another mode is converted as PIL converts a folder's image."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 9, 7), dtype=np.uint8)
    gray = data.to_mode(rgb, "gray")
    for image, g in zip(rgb, gray):
        assert np.array_equal(np.asarray(Image.fromarray(image.transpose(1, 2, 0)).convert("L")), g[0])
    back = data.to_mode(gray, "rgb")
    assert back.shape == (3, 3, 9, 7) and all(np.array_equal(back[:, c], gray[:, 0]) for c in range(3))
    assert data.to_mode(rgb, "rgb") is rgb and data.to_mode(rgb, "auto") is rgb


def test_carve_takes_test_then_val_and_keeps_given_splits():
    train, val, test = data.carve(100, 0, 0.1, test_given=False, val_given=False)
    assert (len(train), len(val), len(test)) == (72, 8, 20)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(100))
    train2, val2, test2 = data.carve(100, 0, 0.1, test_given=True, val_given=True)
    assert val2 is None and test2 is None and np.array_equal(train2, np.arange(100))
    assert not np.array_equal(data.carve(100, 1, 0.1, False, False)[0], train)


def test_an_unlabelled_folder_prepares_for_pretraining_and_auto_reads_its_mode(tmp_path):
    """Images straight in the folder: no classes, labels -1, no test split; `auto` is gray while
    every image is stored gray and rgb once one is in colour (converted, not refused)."""
    from PIL import Image

    from pipeline import folder

    root = tmp_path / "raw" / "loose"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30), dtype=np.uint8), mode="L").save(root / f"{i:02d}.png")
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: skipped
    a = data.prepare("loose", 16, 0.25, 0, tmp_path / "raw")
    assert a["classes"].size == 0 and set(a["y_train"].tolist()) == {-1} and len(a["y_test"]) == 0
    assert a["x_train"].shape == (9, 1, 16, 16) and a["x_val"].shape == (3, 1, 16, 16)
    assert sorted(a["path_train"].tolist() + a["path_val"].tolist()) == [f"{i:02d}.png" for i in range(12)]
    assert folder.detect_mode(folder.scan(root)) == "gray"
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "colour.png")
    assert folder.detect_mode(folder.scan(root)) == "rgb"
    assert data.prepare("loose", 16, 0.25, 0, tmp_path / "raw")["x_train"].shape[1] == 3
    (root / "sub").mkdir()
    with pytest.raises(UserError, match="has no train/ folder"):
        folder.scan(root)


def test_built_in_splits_are_what_they_were_before_image_folders():
    """The splits of a built-in (here digits at its own 8 x 8, so no float resize is involved) are
    byte for byte those of the commit before image folders came (1c1d2c5's `prepare`), so adding
    them changed no committed result."""
    import hashlib

    a = data.prepare("digits", 8, 0.1, 3, Path("data/raw"), True, 700, 200)
    h = hashlib.md5()
    for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        h.update(a[k].tobytes())
    assert h.hexdigest() == "dfedbcedd5f9651d7937b96121960958"


def _labelled(root, per_class, splits=("train",), size=(12, 12), mode="L"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = size[::-1] if mode == "L" else (*size[::-1], 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(
                    root / split / c / f"{i}.png"
                )


def test_given_splits_are_shuffled_so_a_limit_takes_every_class(tmp_path):
    _labelled(tmp_path / "raw" / "abc", 10, splits=("train", "val", "test"))
    a = data.prepare("abc", 12, 0.1, 0, tmp_path / "raw", train_limit=9, test_limit=9)
    assert len(a["y_train"]) == 9 and len(set(a["y_train"].tolist())) == 3
    assert len(a["y_test"]) == 9 and len(set(a["y_test"].tolist())) == 3
    assert len(a["y_val"]) == 30 and a["classes"].tolist() == ["ant", "bee", "cat"]


def test_folder_images_are_upright_eight_bit_and_fitted_not_stretched(tmp_path):
    """EXIF orientation applied; 16-bit and [0, 1] float pixels scaled to 8 bits, not clipped;
    shorter side to the size, centre cropped."""
    from PIL import Image

    from pipeline import folder

    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, 10:30] = 255  # a white centre square in a 40 x 20 image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = folder.fit_files([tmp_path / "wide.png"], "gray", 10)[0, 0]
    # The centre crop is white (bicubic blends a little black into the edge columns); squeezed to
    # 10 x 10, a quarter of each row would be black.
    assert x[:, 1:-1].min() == 255 and x.min() > 200
    tall = Image.fromarray(wide)  # stored 40 x 20, tagged "rotate 90": shown 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert folder._decode(tmp_path, "rotated.jpg")[1].size == (20, 40)
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x16 = folder.fit_files([tmp_path / "deep.png"], "gray", 64)[0, 0]
    assert np.array_equal(x16, (ramp >> 8).astype(np.uint8))
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "half.tiff")
    assert folder.fit_files([tmp_path / "half.tiff"], "gray", 8).max() == 128
    Image.fromarray(np.full((8, 8), 7.0, dtype=np.float32)).save(tmp_path / "hot.tiff")
    with pytest.raises(UserError, match="hot.tiff holds float pixels outside"):
        folder.fit_files([tmp_path / "hot.tiff"], "gray", 8)


def test_folder_layouts_that_would_leave_images_out_are_refused(tmp_path):
    from pipeline import folder

    root = tmp_path / "abc"
    _labelled(root, 3)
    (root / "validation" / "ant").mkdir(parents=True)
    with pytest.raises(UserError, match="validation is not one of train/, val/, test/"):
        folder.scan(root)
    (root / "validation" / "ant").rmdir()
    (root / "validation").rmdir()
    (root / "train" / "ant" / "more").mkdir()
    with pytest.raises(UserError, match="more/ is a folder inside"):
        folder.scan(root)
    (root / "train" / "ant" / "more").rmdir()
    (root / "train" / "ant" / "0.png").unlink()
    (root / "train" / "ant" / "0.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match="cannot read"):
        folder.check_images(folder.scan(root), 1)
    with pytest.raises(UserError, match="leave no test split"):
        data.carve(2, 0, 0.5, test_given=False, val_given=False)
