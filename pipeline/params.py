"""Load params.yaml and validate every value into frozen dataclasses.

Every mistake becomes one UserError that names the parameter, the value and what is allowed.
Unknown keys are errors too: a typo such as `pretrain.epoch` must not silently keep a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .choices import AUGMENTS, HEADS, LOSSES, POOLS, num_visible
from .errors import UserError

DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")  # built in; any other name is an image folder
RGB_DATASETS = ("cifar10",)
MODES = ("auto", "gray", "rgb")  # auto: a built-in's own; a folder's: rgb if any image is stored in colour
# A folder's name under data.raw_dir: one path component, so it cannot point outside raw_dir.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("lars", "sgd", "adamw")
# Lower is better for val_*, higher for *_acc (k-NN / closed-form probe on frozen val features).
SELECT_METRICS = ("val_mse", "val_loss", "knn_acc", "probe_acc")
HIGHER_IS_BETTER = ("knn_acc", "probe_acc")
# Left-right mirroring keeps a garment or an object what it is; it turns digits into non-digits.
MIRROR_SAFE = ("fashion_mnist", "cifar10")


# --- field kinds -------------------------------------------------------------------------------
# Each checker takes (name, value) and returns the cleaned value or raises UserError.


def _bad(name: str, value: Any, allowed: str) -> UserError:
    return UserError(f"params: {name} = {value!r}: {allowed}")


def pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _bad(name, v, "must be a positive integer")
    return v


def seed_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32 - 1:
        raise _bad(name, v, "must be an integer from 0 to 2**32 - 2")
    return v


def batch_int(name, v):
    """Classifier batches feed a BatchNorm, which needs two samples."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise _bad(name, v, "must be an integer >= 2")
    return v


def nonneg_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(name, v, "must be an integer >= 0")
    return v


def opt_pos_int(name, v):
    return None if v is None else pos_int(name, v)


def _number(name, v, allowed):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, v, allowed)
    return float(v)


def pos_float(name, v):
    v2 = _number(name, v, "must be a positive number")
    if v2 <= 0:
        raise _bad(name, v, "must be a positive number")
    return v2


def nonneg_float(name, v):
    v2 = _number(name, v, "must be a number >= 0")
    if v2 < 0:
        raise _bad(name, v, "must be a number >= 0")
    return v2


def fraction(name, v):
    v2 = _number(name, v, "must be a number strictly between 0 and 1")
    if not 0 < v2 < 1:
        raise _bad(name, v, "must be a number strictly between 0 and 1")
    return v2


def unit_interval(name, v):
    v2 = _number(name, v, "must be a number in (0, 1]")
    if not 0 < v2 <= 1:
        raise _bad(name, v, "must be a number in (0, 1]")
    return v2


def half_open_fraction(name, v):
    v2 = _number(name, v, "must be a number in [0, 1)")
    if not 0 <= v2 < 1:
        raise _bad(name, v, "must be a number in [0, 1)")
    return v2


def choice(*options):
    def check(name, v):
        if v not in options:
            raise _bad(name, v, f"must be one of {', '.join(options)}")
        return v

    return check


def string(name, v):
    if not isinstance(v, str) or not v:
        raise _bad(name, v, "must be a non-empty string")
    return v


def boolean(name, v):
    if not isinstance(v, bool):
        raise _bad(name, v, "must be true or false")
    return v


def list_of(item_check):
    def check(name, v):
        if not isinstance(v, list) or not v:
            raise _bad(name, v, "must be a non-empty list")
        out = [item_check(f"{name}[{i}]", x) for i, x in enumerate(v)]
        if len(set(out)) != len(out):
            raise _bad(name, v, "must not repeat a value")
        return tuple(out)

    return check


def same_or(item_check):
    def check(name, v):
        return "same" if v == "same" else item_check(name, v)

    return check


def augment_list(name, v):
    if not isinstance(v, list):
        raise _bad(name, v, f"must be a list of augmentations from {', '.join(AUGMENTS)} ([] for none)")
    for i, op in enumerate(v):
        if op not in AUGMENTS:
            raise _bad(f"{name}[{i}]", op, f"must be one of {', '.join(AUGMENTS)}")
    if len(set(v)) != len(v):
        raise _bad(name, v, "must not repeat an augmentation")
    return tuple(v)


def phase_list(name, v):
    if not isinstance(v, list) or not v:
        raise _bad(name, v, "must be a non-empty list of {epochs: N, augment: [...]} mappings")
    return tuple(_build(Phase, item, f"{name}[{i}].") for i, item in enumerate(v))


def auto_or(item_check):
    def check(name, v):
        return "auto" if v == "auto" else item_check(name, v)

    return check


def count_or_all(name, v):
    if v == "all":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _bad(name, v, "must be a positive integer or all")
    return v


def dataset_name(name, v):
    if v in DATASETS or (isinstance(v, str) and FOLDER_NAME.fullmatch(v)):
        return v
    raise _bad(
        name,
        v,
        f"must be one of {', '.join(DATASETS)}, or the name of an image folder under data.raw_dir "
        f'(letters, digits, _ . -; README "Your own images")',
    )


def is_folder(dataset: str) -> bool:
    return dataset not in DATASETS


def channels(dataset: str, mode: str) -> int | None:
    """Image channels of `dataset` read in `mode`; None when only the images can tell (a folder, auto)."""
    if mode != "auto":
        return 3 if mode == "rgb" else 1
    if is_folder(dataset):
        return None
    return 3 if dataset in RGB_DATASETS else 1


def auto_or_bool(name, v):
    if v == "auto" or isinstance(v, bool):
        return v
    raise _bad(name, v, "must be auto, true or false")


def _field(check, default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"check": check})


# --- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GridParams:
    patch: tuple = _field(list_of(pos_int))
    mask_ratio: tuple = _field(list_of(fraction))


@dataclass(frozen=True, kw_only=True)
class DataParams:
    dataset: str = _field(dataset_name)
    image_size: int = _field(pos_int)
    val_fraction: float = _field(fraction)
    train_limit: int | None = _field(opt_pos_int, None)
    test_limit: int | None = _field(opt_pos_int, None)
    raw_dir: str = _field(string, "data/raw")
    verify_checksums: bool = _field(boolean, True)
    mode: str = _field(choice(*MODES), "auto")


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    dim: int = _field(pos_int)
    depth: int = _field(pos_int)
    heads: int = _field(pos_int)
    mlp_ratio: float = _field(pos_float, 4.0)
    decoder_dim: int = _field(pos_int)
    decoder_depth: int = _field(pos_int)
    decoder_heads: int = _field(pos_int)
    pool: str = _field(choice(*POOLS), "cls")


@dataclass(frozen=True, kw_only=True)
class Phase:
    epochs: int = _field(pos_int)
    augment: tuple = _field(augment_list, ())

    def describe(self) -> str:
        return f"{self.epochs}x{'+'.join(self.augment) or 'none'}"


@dataclass(frozen=True, kw_only=True)
class MAESchedule:
    """How an MAE trains: phases run back to back under one warm-up + cosine schedule (one
    optimiser, one curve). Shared by the grid screen and `pretrain_full`."""

    phases: tuple = _field(phase_list)
    batch_size: int = _field(pos_int)
    lr: float = _field(pos_float)
    weight_decay: float = _field(nonneg_float)
    warmup_epochs: float = _field(nonneg_float, 0.0)

    @property
    def epochs(self) -> int:
        return sum(ph.epochs for ph in self.phases)

    def phase_of(self) -> list[int]:
        """Phase number (1-based) of every epoch (1-based index - 1)."""
        return [i for i, ph in enumerate(self.phases, 1) for _ in range(ph.epochs)]


@dataclass(frozen=True, kw_only=True)
class PretrainParams(MAESchedule):
    loss: str = _field(choice(*LOSSES), "mse")
    train_limit: int | None = _field(opt_pos_int, None)
    val_limit: int | None = _field(opt_pos_int, None)


@dataclass(frozen=True, kw_only=True)
class PretrainFullParams(MAESchedule):
    """The selected cell, pretrained on: same loss, decoder and mask ratio as in the grid."""

    train_limit: int | None = _field(opt_pos_int, None)


@dataclass(frozen=True, kw_only=True)
class DownstreamParams:
    dataset: str = _field(same_or(dataset_name), "same")
    image_size: Any = _field(same_or(pos_int), "same")
    mode: str = _field(same_or(choice(*MODES)), "same")
    # The labelled training images: this many per class, drawn with the seed (all: every one).
    labels_per_class: Any = _field(count_or_all, "all")
    # The share of each repetition's budget held out from training: the run's own choices (the
    # registry champion) are scored on it, never on val.
    dev_fraction: float = _field(fraction, 0.1)


@dataclass(frozen=True, kw_only=True)
class SelectParams:
    metric: str = _field(choice(*SELECT_METRICS), "val_mse")
    knn_k: int = _field(pos_int, 20)
    folds: int = _field(pos_int, 5)


@dataclass(frozen=True, kw_only=True)
class TrainLength:
    """How long a classifier trains, by one rule for every arm and budget: `epochs` passes over its
    training labels, but never fewer than `min_steps` steps (a small budget is not starved)."""

    min_steps: int = _field(pos_int)
    epochs: float = _field(pos_float)

    def steps_for(self, n_train: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * n_train / self.batch_size))


@dataclass(frozen=True, kw_only=True)
class ProbeParams(TrainLength):
    head: str = _field(choice(*HEADS), "linear")
    optimizer: str = _field(choice(*OPTIMIZERS), "lars")
    batch_size: int = _field(batch_int)
    lr: float = _field(pos_float)
    weight_decay: float = _field(nonneg_float, 0.0)
    warmup_steps: int = _field(nonneg_int, 0)
    mlp_hidden: int = _field(pos_int, 512)


@dataclass(frozen=True, kw_only=True)
class FinetuneParams(TrainLength):
    head: str = _field(choice(*HEADS), "linear")
    optimizer: str = _field(choice(*OPTIMIZERS), "adamw")
    batch_size: int = _field(batch_int)
    lr_encoder: float = _field(pos_float)
    lr_head: float = _field(pos_float)
    weight_decay: float = _field(nonneg_float, 0.05)
    warmup_steps: int = _field(nonneg_int, 0)
    layer_decay: float = _field(unit_interval, 1.0)
    label_smoothing: float = _field(half_open_fraction, 0.0)
    drop_path: float = _field(half_open_fraction, 0.0)
    augment: tuple = _field(augment_list, ())
    mlp_hidden: int = _field(pos_int, 512)


@dataclass(frozen=True, kw_only=True)
class MlflowParams:
    experiment: str = _field(string, "maepipe")


@dataclass(frozen=True, kw_only=True)
class Params:
    seed: int = _field(seed_int)
    repetitions: tuple = _field(list_of(nonneg_int))
    device: str = _field(choice(*DEVICES))
    compile: Any = _field(auto_or_bool, "auto")
    patch: Any = _field(auto_or(pos_int))
    mask_ratio: Any = _field(auto_or(fraction))
    grid: GridParams = _field(None)
    data: DataParams = _field(None)
    model: ModelParams = _field(None)
    pretrain: PretrainParams = _field(None)
    select: SelectParams = _field(None)
    pretrain_full: PretrainFullParams = _field(None)
    downstream: DownstreamParams = _field(None)
    probe: ProbeParams = _field(None)
    finetune: FinetuneParams = _field(None)
    mlflow: MlflowParams = _field(None)

    def cells(self) -> list[tuple[int, float]]:
        return [(p, m) for p in self.grid.patch for m in self.grid.mask_ratio]

    @property
    def downstream_dataset(self) -> str:
        return self.data.dataset if self.downstream.dataset == "same" else self.downstream.dataset

    @property
    def downstream_mode(self) -> str:
        return self.data.mode if self.downstream.mode == "same" else self.downstream.mode

    @property
    def downstream_size(self) -> int:
        return self.data.image_size if self.downstream.image_size == "same" else self.downstream.image_size


def cell_name(patch: int, mask_ratio: float) -> str:
    # str(), not a rounding format: it must match the text DVC puts into dvc.yaml's paths.
    return f"p{patch}-m{mask_ratio}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Params (or a section) as {'pretrain.epochs': 10, ...}: the names MLflow shows."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif f.name == "phases":
            out[key] = ",".join(ph.describe() for ph in value)
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


# --- loading -----------------------------------------------------------------------------------


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise UserError(f"params: {where} = {raw!r}: must be a mapping of keys to values")
    known = {f.name: f for f in fields(cls)}
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise UserError(f"params: {where}: key {odd[0]!r} is not a name (allowed in {where}: {', '.join(known)})")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        key = unknown[0]
        shown = key if key.isprintable() and key.strip() == key != "" else repr(key)
        raise UserError(f"params: {prefix}{shown}: unknown key (allowed in {where}: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        section = _SECTIONS.get(name) if cls is Params else None
        if name not in raw:
            if section is not None or f.default is dataclasses.MISSING:
                raise UserError(f"params: {key}: missing (required)")
            values[name] = f.default
        elif section is not None:
            values[name] = _build(section, raw[name], key + ".")
        else:
            values[name] = f.metadata["check"](key, raw[name])
    return cls(**values)


_SECTIONS = {
    "grid": GridParams,
    "data": DataParams,
    "model": ModelParams,
    "pretrain": PretrainParams,
    "select": SelectParams,
    "pretrain_full": PretrainFullParams,
    "downstream": DownstreamParams,
    "probe": ProbeParams,
    "finetune": FinetuneParams,
    "mlflow": MlflowParams,
}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_cell(p: Params, patch: int, mask_ratio: float, what: str = "grid") -> None:
    """A (patch, mask) pair must tile the image and leave at least one visible and one hidden patch."""
    size = p.data.image_size
    if size % patch:
        raise UserError(
            f"params: {what}.patch = {patch}: must divide data.image_size = {size} "
            f"(allowed: {', '.join(map(str, divisors(size)))})"
        )
    patches = (size // patch) ** 2
    visible = num_visible(patches, mask_ratio)
    if visible < 1 or visible >= patches:
        raise UserError(
            f"params: {what}.mask_ratio = {mask_ratio:g}: with patch {patch} "
            f"({patches} patches) it leaves {visible} visible; must leave at least one "
            f"visible and one hidden patch"
        )


def check_downstream_size(p: Params, patch: int) -> None:
    """The encoder's patch must tile the downstream images; its positions are resampled to that grid."""
    what = "downstream.image_size" if p.downstream.image_size != "same" else "data.image_size"
    require_patch_divides(p.downstream_size, patch, what)


def require_patch_divides(size: int, patch: int, what: str) -> None:
    """The one wording of "the selected encoder's patch must tile the downstream images", whether
    params (validate, select) or the prepared data (the arms) tell the size."""
    if size % patch:
        raise UserError(
            f"params: {what} = {size}: the selected encoder has patch {patch}, which must divide "
            f"the downstream image size (sizes allowed: multiples of {patch})"
        )


def validate(p: Params) -> Params:
    for patch in p.grid.patch:
        for mask in p.grid.mask_ratio:
            check_cell(p, patch, mask)
    for pin, options in (("patch", p.grid.patch), ("mask_ratio", p.grid.mask_ratio)):
        value = getattr(p, pin)
        if value != "auto" and value not in options:
            shown = ", ".join(f"{x}" for x in options)
            raise UserError(f"params: {pin} = {value!r}: not in grid.{pin} [{shown}]; use one of those or auto")
    if p.pretrain.loss == "norm_pix":
        if p.select.metric == "val_mse":
            raise UserError(
                "params: select.metric = 'val_mse' with pretrain.loss = 'norm_pix': a norm_pix "
                "model predicts each patch only up to its own mean/std, so its pixel MSE needs the "
                "hidden patch's statistics and is no fair yardstick; use select.metric: val_loss"
            )
        small = [x for x in p.grid.patch if x * x * (channels(p.data.dataset, p.data.mode) or 1) < 2]
        if small:
            raise UserError(
                f"params: grid.patch = {small[0]}: norm_pix normalises each patch by its own "
                f"std, which needs at least 2 pixels per patch"
            )
    flips = [
        (f"{section}.phases[{i}].augment", phase.augment, p.data.dataset)
        for section in ("pretrain", "pretrain_full")
        for i, phase in enumerate(getattr(p, section).phases)
    ]
    flips.append(("finetune.augment", p.finetune.augment, p.downstream_dataset))
    for name, ops, dataset in flips:
        # A folder's owner knows whether a mirrored image is still its class; flip is theirs to ask for.
        if "flip" in ops and dataset not in MIRROR_SAFE and not is_folder(dataset):
            raise UserError(
                f"params: {name} = {list(ops)!r}: flip is not allowed for {dataset} (a mirrored "
                f"digit is not a digit); allowed for {', '.join(MIRROR_SAFE)} and image folders"
            )
    for section in ("probe", "finetune"):
        s = getattr(p, section)
        if s.warmup_steps >= s.min_steps:
            raise UserError(
                f"params: {section}.warmup_steps = {s.warmup_steps}: must be less than "
                f"{section}.min_steps = {s.min_steps}"
            )
    if p.patch != "auto":
        check_downstream_size(p, p.patch)
    elif not any(p.downstream_size % patch == 0 for patch in p.grid.patch):
        check_downstream_size(p, p.grid.patch[0])
    m = p.model
    if m.dim % 4:
        raise UserError(f"params: model.dim = {m.dim}: must be a multiple of 4 (2-D sin-cos positions)")
    if m.dim % m.heads:
        raise UserError(f"params: model.heads = {m.heads}: must divide model.dim = {m.dim}")
    if m.decoder_dim % 4:
        raise UserError(f"params: model.decoder_dim = {m.decoder_dim}: must be a multiple of 4")
    if m.decoder_dim % m.decoder_heads:
        raise UserError(
            f"params: model.decoder_heads = {m.decoder_heads}: must divide model.decoder_dim = {m.decoder_dim}"
        )
    return p


def parse(raw: Any) -> Params:
    return validate(_build(Params, raw, ""))


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"params: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"params: {path} is not UTF-8 text (byte {e.start}): a params file is YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(
            f"params: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}"
        ) from None
    return parse(raw)
