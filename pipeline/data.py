"""Datasets: where they come from, how their files are checked and read, and the prepared file.

A built-in dataset's sources are tried in order: a local copy under `data.raw_dir/<dataset>`, an
OS package, a bundled copy (scikit-learn's digits), then torchvision's real download into the
local folder. Any other name is an image folder `data.raw_dir/<name>` (`pipeline.folder`).
The prepared file is one `.npz` per dataset with uint8 NCHW images and fixed splits (and, for a
folder, every image's source path and MD5); it is read with `allow_pickle=False`.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import folder as image_folder
from .errors import UserError
from .fsutil import md5

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


@dataclass(frozen=True)
class Spec:
    name: str
    format: str  # idx | cifar | sklearn
    classes: tuple[str, ...]
    # Known MD5s: of the file as published (gz / batch), and for IDX of its decompressed bytes
    # (Debian recompresses the gz files, so only the content digest matches there).
    md5: dict[str, str] = field(default_factory=dict)
    md5_content: dict[str, str] = field(default_factory=dict)
    os_dirs: tuple[str, ...] = ()
    torchvision: str | None = None  # class name in torchvision.datasets
    torchvision_subdir: str | None = None  # where that class keeps its files under root


DIGIT_NAMES = tuple(str(i) for i in range(10))

SPECS = {
    "fashion_mnist": Spec(
        "fashion_mnist",
        "idx",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        md5_content={
            "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        os_dirs=("/usr/share/datasets/fashion-mnist",),
        torchvision="FashionMNIST",
        torchvision_subdir="FashionMNIST/raw",
    ),
    "mnist": Spec(
        "mnist",
        "idx",
        DIGIT_NAMES,
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        torchvision="MNIST",
        torchvision_subdir="MNIST/raw",
    ),
    "cifar10": Spec(
        "cifar10",
        "cifar",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        torchvision="CIFAR10",
        torchvision_subdir="cifar-10-batches-py",
    ),
    "digits": Spec("digits", "sklearn", DIGIT_NAMES),
}

# Digits, and a labelled folder without test/, have no test split: a fixed one is carved with the seed.
TEST_FRACTION = 0.2


# --- file formats --------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed) as a uint8 array; raises UserError if it is not one."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"data: {path} is corrupt (not a readable gzip file: {e})") from None
    return parse_idx(raw, path)


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"data: {path} is corrupt (not an unsigned-byte IDX file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise UserError(f"data: {path} is corrupt (truncated IDX header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise UserError(
            f"data: {path} is corrupt (IDX header says {shape}, file holds {len(raw) - header} bytes of data)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 [N, 3, 32, 32], int64 [N])."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"data: {path} is corrupt (not a CIFAR-10 python batch: {e})") from None
    if len(images) != len(labels):
        raise UserError(f"data: {path} is corrupt ({len(images)} images but {len(labels)} labels)")
    return images, labels


def verify(spec: Spec, folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if spec.md5.get(name) == md5(path):
            continue
        if name in spec.md5_content:
            try:
                with gzip.open(path, "rb") as f:
                    content = f.read()
            except (OSError, EOFError, zlib.error) as e:
                raise UserError(f"data: {path} is corrupt (not a readable gzip file: {e})") from None
            if hashlib.md5(content).hexdigest() == spec.md5_content[name]:
                continue
        raise UserError(
            f"data: {path} fails its checksum: the file is corrupt or not the official "
            f"{spec.name}; replace it, or set data.verify_checksums: false for your own copy"
        )


# --- sources ------------------------------------------------------------------------------------


def _file_names(spec: Spec) -> list[str]:
    return list(IDX_FILES.values()) if spec.format == "idx" else CIFAR_TRAIN + CIFAR_TEST


def _complete(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def candidate_dirs(spec: Spec, raw_dir: Path) -> list[Path]:
    local = raw_dir / spec.name
    dirs = [local]
    if spec.torchvision_subdir:
        dirs.append(local / spec.torchvision_subdir)
    return dirs + [Path(d) for d in spec.os_dirs]


def locate(spec: Spec, raw_dir: Path, download: bool = True) -> Path:
    """The folder that holds the dataset's files, downloading with torchvision as a last resort."""
    names = _file_names(spec)
    for folder in candidate_dirs(spec, raw_dir):
        if _complete(folder, names):
            return folder
    if download and spec.torchvision:
        error = _download(spec, raw_dir / spec.name)
        folder = raw_dir / spec.name / spec.torchvision_subdir
        if error is None and _complete(folder, names):
            return folder
    else:
        error = "download disabled"
    raise UserError(
        f"data: cannot obtain {spec.name}: put {', '.join(names)} in {raw_dir / spec.name}/"
        + (f" (or install the OS package that provides {spec.os_dirs[0]})" if spec.os_dirs else "")
        + f"; torchvision download failed: {error}"
    )


def _download(spec: Spec, root: Path) -> str | None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision)
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any network/integrity failure becomes one message
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def load_raw(spec: Spec, raw_dir: Path, verify_checksums: bool, download: bool = True):
    """-> (x_train, y_train, x_test, y_test) as uint8 NCHW images and int64 labels."""
    if spec.format == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        return images, d.target.astype(np.int64), None, None
    folder = locate(spec, raw_dir, download)
    names = _file_names(spec)
    if verify_checksums:
        verify(spec, folder, names)
    if spec.format == "idx":
        parts = {k: read_idx(folder / v) for k, v in IDX_FILES.items()}
        for split in ("train", "test"):
            images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise UserError(f"data: {folder} is corrupt ({split}: images {images.shape}, labels {labels.shape})")
        return (
            parts["train_images"][:, None],
            parts["train_labels"].astype(np.int64),
            parts["test_images"][:, None],
            parts["test_labels"].astype(np.int64),
        )
    train = [read_cifar_batch(folder / n) for n in CIFAR_TRAIN]
    test = read_cifar_batch(folder / CIFAR_TEST[0])
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *test)


# --- preparation --------------------------------------------------------------------------------


def resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def to_mode(images: np.ndarray, mode: str) -> np.ndarray:
    """uint8 N x C x H x W images in `mode` (gray: ITU-R 601 luma in PIL's fixed point, so a built-in
    and a folder of the same images agree to the byte; rgb: gray repeated)."""
    if mode == "gray" and images.shape[1] == 3:
        r, g, b = (images[:, i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    if mode == "rgb" and images.shape[1] == 1:
        return np.repeat(images, 3, axis=1)
    return images


def _built_in(dataset, raw_dir, verify_checksums, download, mode):
    """-> (train, given val or None, test or None, classes); a split is (images, labels, manifest or None)."""
    spec = SPECS[dataset]
    x_train, y_train, x_test, y_test = load_raw(spec, raw_dir, verify_checksums, download)
    for split, labels in (("train", y_train), ("test", y_test)):
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(spec.classes)):
            raise UserError(
                f"data: {dataset} {split} labels run from {labels.min()} to {labels.max()}; "
                f"expected 0..{len(spec.classes) - 1}: the files are corrupt"
            )
    if mode != "auto":
        x_train = to_mode(x_train, mode)
        x_test = None if x_test is None else to_mode(x_test, mode)
    test = None if x_test is None else (x_test, y_test, None)
    return (x_train, y_train, None), None, test, spec.classes


def folder_order(n: int, seed: int) -> np.ndarray:
    """A folder lists its files class by class; every split of it is put in this seeded order, so a
    limit (`data.train_limit`, `pretrain.train_limit`, ...) takes a random subset, not the first
    classes. A stream of its own, so the carve draws what it draws for a built-in."""
    return np.random.default_rng([seed, 0x464F4C44]).permutation(n)


def _folder(dataset, raw_dir, image_size, mode, min_side, seed):
    layout = image_folder.scan(raw_dir / dataset)
    if mode == "auto":
        mode = image_folder.detect_mode(layout)
    parts = image_folder.read(layout, mode, image_size, min_side)

    def split(name):
        if name not in parts:
            return None
        part = parts[name]
        return _take(
            (part["x"], part["y"], {"path": part["path"], "md5": part["md5"]}), folder_order(len(part["y"]), seed)
        )

    train, test = split("train"), split("test")
    if test is None and not layout.labelled:  # pretraining only: no test split to carve
        test = _take(train, np.arange(0))
    return train, split("val"), test, layout.classes


def _take(split, idx):
    x, y, manifest = split
    return x[idx], y[idx], None if manifest is None else {k: v[idx] for k, v in manifest.items()}


def carve(n: int, seed: int, val_fraction: float, test_given: bool, val_given: bool):
    """-> (train, val, test) indices into a source's n training images; val / test are None where
    the source has its own split. Labels alone decide it, so `validate` counts a folder's budget
    exactly, before anything is decoded."""
    rng = np.random.default_rng(seed)
    rest, val, test = np.arange(n), None, None
    if not test_given:
        order = rng.permutation(n)
        n_test = int(round(n * TEST_FRACTION))
        if n_test < 1:
            raise UserError(
                f"data: {n} training images leave no test split ({TEST_FRACTION:.0%} of them rounds to 0); "
                f"add a test/ folder or more images"
            )
        test, rest = order[:n_test], order[n_test:]
    if not val_given:
        order = rng.permutation(len(rest))
        n_val = int(round(len(order) * val_fraction))
        if n_val < 1 or n_val >= len(order):
            raise UserError(
                f"params: data.val_fraction = {val_fraction:g}: leaves {n_val} of "
                f"{len(order)} images for validation; need at least one in each split"
            )
        val, rest = rest[order[:n_val]], rest[order[n_val:]]
    return rest, val, test


def prepare(
    dataset: str,
    image_size: int,
    val_fraction: float,
    seed: int,
    raw_dir: Path,
    verify_checksums: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = True,
    mode: str = "auto",
    min_side: int = 1,
) -> dict[str, np.ndarray]:
    """The prepared arrays of `dataset`: train / val / test images resized to `image_size`, labels,
    class names and the training split's per-channel mean and std; for an image folder also each
    image's source path and MD5 (`path_<split>`, `md5_<split>`). A split the source lacks is carved
    with `seed`: test (TEST_FRACTION of train), then val (`val_fraction` of what is left)."""
    if dataset in SPECS:
        train, val, test, classes = _built_in(dataset, raw_dir, verify_checksums, download, mode)
    else:
        train, val, test, classes = _folder(dataset, raw_dir, image_size, mode, min_side, seed)
    train_idx, val_idx, test_idx = carve(len(train[0]), seed, val_fraction, test is not None, val is not None)
    test = test if test_idx is None else _take(train, test_idx)
    val = val if val_idx is None else _take(train, val_idx)
    train = _take(train, train_idx if train_limit is None else train_idx[:train_limit])
    if test_limit is not None:
        test = _take(test, np.arange(min(test_limit, len(test[0]))))
    x_tr = resize(train[0], image_size)
    # Mean/std of the training split only: nothing about val/test leaks into the model.
    scaled = x_tr.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3)).astype(np.float32)
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-3).astype(np.float32)
    out = {
        "x_train": np.ascontiguousarray(x_tr),
        "y_train": train[1],
        "x_val": resize(val[0], image_size),
        "y_val": val[1],
        "x_test": resize(test[0], image_size),
        "y_test": test[1],
        "classes": np.array(classes, dtype=str),
        "mean": mean,
        "std": std,
    }
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split[2] is not None:
            out.update({f"{key}_{name}": values for key, values in split[2].items()})
    return out
