"""Stage `validate`: the whole params file, every value and every cross-field rule (checked when
`params.load` built `p`), plus what only this machine can tell: whether the device exists, whether
an image folder named by `data.dataset` / `downstream.dataset` exists in a layout maepipe reads
with images that decode and are large enough (the folder is a dep: a bad image stops the run here,
before DVC removes any output), and whether the label budget fits.

Under DVC it writes a constant marker every other stage depends on: a valid edit rewrites the same
bytes, so only the stages whose own params changed re-run, and an invalid one stops `dvc repro`
before DVC removes any other stage's outputs."""

from pathlib import Path

import numpy as np

from .. import data, folder, prepared
from ..errors import UserError
from ..fsutil import write_bytes
from ..params import DATASETS, Params, is_folder
from ..runtime import resolve_device
from .budget import check_early

# Which folder images already passed check_images (not a DVC output: a cache of this checkout).
FOLDER_CHECKS = Path(".maepipe/folder-checks")


def check_folders(p: Params) -> None:
    raw = Path(p.data.raw_dir)
    layouts = {}
    for name, dataset in (("data.dataset", p.data.dataset), ("downstream.dataset", p.downstream_dataset)):
        if not is_folder(dataset) or dataset in layouts:
            continue
        if not (raw / dataset).is_dir():
            raise UserError(
                f"params: {name} = {dataset!r}: not a built-in dataset ({', '.join(DATASETS)}), and "
                f'no image folder {raw / dataset}/ (README "Your own images")'
            )
        layouts[dataset] = folder.scan(raw / dataset)
        folder.check_images(layouts[dataset], max(p.grid.patch), FOLDER_CHECKS / f"{dataset}.json")
    down = layouts.get(p.downstream_dataset)
    if down is not None and not down.labelled:
        raise folder.unlabelled_downstream(p.downstream.dataset, p.data.dataset)
    for dataset, layout in layouts.items():
        # Labels alone decide the splits, so the budget is counted exactly as `data` will cut it,
        # and a folder too small to split is refused here, before `data` runs.
        labels = np.array([c for _, c in layout.files["train"]], dtype=np.int64)
        labels = labels[data.folder_order(len(labels), p.seed)]
        test_given = "test" in layout.files or not layout.labelled
        keep, _, _ = data.carve(len(labels), p.seed, p.data.val_fraction, test_given, "val" in layout.files)
        if dataset != p.downstream_dataset:
            continue
        budget = p.downstream.labels_per_class
        if budget == "all":
            continue
        if p.data.train_limit is not None:
            keep = keep[: p.data.train_limit]
        for name, n in zip(layout.classes, np.bincount(labels[keep], minlength=len(layout.classes))):
            if n < budget:
                raise prepared.budget_too_large(budget, name, int(n))


def run(p: Params, marker: Path | None, source: str) -> None:
    resolve_device(p.device)
    check_folders(p)
    if not is_folder(p.downstream_dataset):  # a folder's budget was counted exactly, from the folder as it is now
        check_early(p)
    if marker is not None:
        write_bytes(marker, b"params.yaml passed validation\n")
    print(f"{source}: ok ({len(p.cells())} grid cells)")
