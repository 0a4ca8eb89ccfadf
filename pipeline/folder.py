"""Image folders: a user's own images, in the layout torchvision's ImageFolder reads.

    <raw_dir>/<name>/train/<class>/<image>   labelled; val/ and test/ (same layout) are optional
    <raw_dir>/<name>/<image>                 unlabelled: pretraining only

Class names are the train/ subfolder names, sorted. Any format PIL decodes with one of
torchvision's image suffixes is read; hidden files (a leading dot) are skipped, anything else is an
error, so no file is silently left out. Every image is converted to one mode (gray: PIL's "L", the
ITU-R 601 luma; rgb: "RGB"; a palette or an alpha channel is flattened first) and fitted to
image_size x image_size: scaled so its shorter side is image_size (bicubic, antialiased), then its
centre cropped (PIL's ImageOps.fit), so nothing is stretched.

`scan` reads only the directory tree (cheap: `validate` calls it on every run); `read` decodes.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val", "test")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MODES = {"gray": "L", "rgb": "RGB"}


@dataclass(frozen=True)
class Layout:
    root: Path
    classes: tuple[str, ...]  # () for an unlabelled folder
    files: dict[str, tuple[tuple[str, int], ...]]  # split -> ((path relative to root, class index), ...)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _images_in(folder: Path, root: Path, subdirs_ok: bool = False) -> list[str]:
    """The images directly in `folder` (relative to root, sorted); any other visible file, or a
    folder where none belongs, is an error: nothing is left out without a word."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if subdirs_ok:
                continue
            raise UserError(f"data: {path}/ is a folder inside {folder}/; maepipe reads no deeper (flatten it)")
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(
                f"data: {path} is not an image file (image folders hold only {', '.join(SUFFIXES)} files; "
                f"move it out, or hide it with a leading dot)"
            )
        found.append(path.relative_to(root).as_posix())
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: Path) -> Layout:
    """The folder's splits, classes and files, from the directory tree alone; one UserError for a
    layout maepipe cannot read."""
    if not root.is_dir():
        raise UserError(f'data: image folder {root}/ does not exist (README "Your own images" shows the layout)')
    train = root / "train"
    if not train.is_dir():
        images = _images_in(root, root, subdirs_ok=True)
        if _subdirs(root) or not images:
            raise UserError(
                f"data: {root}/ has no train/ folder: a labelled image folder is train/<class>/<images> "
                f"(val/ and test/ optional); an unlabelled one holds its images directly"
            )
        return Layout(root, (), {"train": tuple((f, -1) for f in images)})
    classes = tuple(d.name for d in _subdirs(train))
    if not classes:
        raise UserError(f"data: {train}/ has no class folders: put each class's images in train/<class>/")
    other = [q.name for q in sorted(root.iterdir()) if not q.name.startswith(".") and q.name not in SPLITS]
    if other:
        raise UserError(
            f"data: {root / other[0]} is not one of train/, val/, test/ (a labelled folder holds only "
            f"those; a split under another name would be ignored and carved from train/ instead)"
        )
    files = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        loose = _images_in(folder, root, subdirs_ok=True)
        if loose:
            raise UserError(f"data: {root / loose[0]} lies in {split}/ itself; every image belongs in {split}/<class>/")
        names = [d.name for d in _subdirs(folder)]
        stray = [n for n in names if n not in classes]
        if stray:
            raise UserError(
                f"data: {folder / stray[0]}/ is a class that train/ does not have "
                f"(train/ has: {', '.join(classes)}); a model cannot learn a class it never sees"
            )
        entries = []
        for c, name in enumerate(classes):
            if name not in names:
                continue
            images = _images_in(folder / name, root)
            if not images and split == "train":
                raise UserError(f"data: class folder {folder / name}/ holds no images")
            entries += [(f, c) for f in images]
        if split != "train" and not entries:
            raise UserError(f"data: {folder}/ holds no images; remove it to carve {split} from train/")
        files[split] = tuple(entries)
    return Layout(root, classes, files)


def unlabelled_downstream(downstream: str, data_dataset: str) -> UserError:
    shown = repr(downstream) + (f" (data.dataset = {data_dataset!r})" if downstream == "same" else "")
    return UserError(
        f"params: downstream.dataset = {shown}: an unlabelled image folder (no train/<class>/ folders) "
        f"can be pretrained on, but the downstream arms need labels; set downstream.dataset to a "
        f"labelled folder or a built-in dataset"
    )


def _decode(root: Path, rel: str):
    """(the file's MD5, its PIL image, fully loaded)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = root / rel
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"data: cannot read {path} ({e.strerror or e})") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        image = _eight_bit(ImageOps.exif_transpose(image), path)  # a phone photo's stored rotation
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"data: {path} is not an image PIL can read (corrupt, or not what its suffix says)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"data: {path} is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"data: {path} is corrupt or truncated ({e})") from None
    return hashlib.md5(raw).hexdigest(), image


def _eight_bit(image, path: Path):
    """16-bit and 32-bit integer images scaled to 8 bits (PIL's own conversion clips them white);
    float images in [0, 1] scaled by 255, other floats refused (their range is unknowable)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        a = np.asarray(image).astype(np.int64)
        if a.min() < 0:
            raise UserError(f"data: {path} holds negative pixel values (mode {image.mode}); save it as 8- or 16-bit")
        shift = 0 if a.max() <= 255 else 8  # 8-bit values stored wide keep their scale
        return Image.fromarray((np.minimum(a >> shift, 255)).astype(np.uint8), mode="L")
    if image.mode == "F":
        a = np.asarray(image, dtype=np.float64)
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise UserError(f"data: {path} holds float pixels outside [0, 1]; save it as 8- or 16-bit")
        return Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L")
    return image


def _check_size(width: int, height: int, min_side: int, path: Path) -> None:
    if min(width, height) < min_side:
        raise UserError(
            f"data: {path} is {width}x{height} pixels: smaller than the largest patch "
            f"({min_side}); use larger images, or smaller grid.patch"
        )


def _fit(image, mode: str, size: int, min_side: int, path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    _check_size(*image.size, min_side, path)
    if image.mode in ("P", "PA") or "A" in image.getbands():
        image = image.convert("RGBA")  # a palette or transparency: resolved to colours first
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert(MODES[mode])
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def detect_mode(layout: Layout) -> str:
    """`auto` for a folder: gray when every image is stored single-channel, else rgb (headers only)."""
    from PIL import Image

    for split in layout.files.values():
        for rel, _ in split:
            try:
                with Image.open(layout.root / rel) as image:
                    if image.mode not in GRAY_MODES:
                        return "rgb"
            except (OSError, Image.DecompressionBombError):
                continue  # check_images / read name the file
    return "gray"


def check_images(layout: Layout, min_side: int, cache: Path | None = None) -> None:
    """Decode every image once, so a file that is corrupt, truncated or too small is named by
    `validate`, before `data` runs. What passed is kept in `cache` by file size, mtime, ctime and
    inode (with each image's size, for the patch check), so a later run decodes only new or
    changed files (a copy that keeps the mtime still changes the ctime)."""
    import json

    from .fsutil import write_bytes

    root = str(layout.root.resolve())
    known = {}
    if cache is not None:
        try:
            saved = json.loads(cache.read_text())
            known = saved["files"] if saved.get("root") == root else {}
        except (OSError, ValueError, KeyError, TypeError):
            known = {}
    entries = [rel for split in layout.files.values() for rel, _ in split]

    def one(rel):
        path = layout.root / rel
        try:
            stat = path.stat()
        except OSError as e:
            raise UserError(f"data: cannot read {path} ({e.strerror or e})") from None
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        seen = known.get(rel)
        if seen and seen[:4] == stamp:
            width, height = seen[4:]
        else:
            _, image = _decode(layout.root, rel)
            width, height = image.size
        _check_size(width, height, min_side, path)
        return rel, [*stamp, width, height]

    with ThreadPoolExecutor() as pool:
        checked = dict(pool.map(one, entries))
    if cache is not None and checked != known:
        write_bytes(cache, json.dumps({"root": root, "files": checked}).encode())


def fit_files(paths: list[Path | str], mode: str, size: int) -> np.ndarray:
    """Image files as the model takes them (uint8 N x C x size x size), read exactly as `data`
    reads a folder's: for a request to the served model."""
    fitted = []
    for path in map(Path, paths):
        _, image = _decode(path.parent, path.name)
        fitted.append(_fit(image, mode, size, 1, path))
    return np.stack(fitted)


def read(layout: Layout, mode: str, size: int, min_side: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """Every split's images (uint8 N x C x size x size), labels (int64; -1 unlabelled), paths and
    md5s, decoded in threads (PIL releases the GIL while it decodes)."""
    out = {}
    with ThreadPoolExecutor() as pool:
        for split, entries in layout.files.items():

            def one(entry, split=split):
                rel, _ = entry
                digest, image = _decode(layout.root, rel)
                return digest, _fit(image, mode, size, min_side, layout.root / rel)

            done = list(pool.map(one, entries))
            channels = 1 if mode == "gray" else 3
            out[split] = {
                "x": np.stack([x for _, x in done]) if done else np.zeros((0, channels, size, size), np.uint8),
                "y": np.array([c for _, c in entries], dtype=np.int64),
                "path": np.array([rel for rel, _ in entries], dtype=str),
                "md5": np.array([d for d, _ in done], dtype=str),
            }
    return out
