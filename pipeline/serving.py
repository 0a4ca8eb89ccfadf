"""A downstream classifier as an MLflow model: `mlflow.pyfunc.load_model(uri)` or
`mlflow models serve` take images as users have them and return classes.

The model is a pyfunc around the stage's checkpoint: the checkpoint is its artifact and the
`pipeline` package travels with it (`code_paths`), so it loads in any process and directory where
torch and mlflow are installed, without this repository. It is logged as a model from code (this
file), not as a pickled object, so loading it runs this reviewed file rather than unpickling
arbitrary bytes. Input: uint8 images (0-255) or floats in [0, 1], shaped (N, C, H, W) or (N, H, W)
for one channel, at the downstream size; the encoder normalises them itself (its mean and std are in
its config). Output: one row per image with the class index, its name and the probability of each
class.

No relative import at module level: MLflow executes this file on its own to build the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

try:  # the base class when MLflow is present; plain object keeps `pipeline` importable without it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a requirement of the pipeline
    PythonModel = object

PACKAGE_DIR = Path(__file__).resolve().parent
# Versions the served model needs, taken from the running environment at logging time.
SERVE_PACKAGES = ("torch", "numpy", "pandas", "mlflow")


class ClassifierModel(PythonModel):
    def load_context(self, context) -> None:

        from pipeline import checkpoint

        self.classes = list(context.model_config["classes"])
        self.clf = checkpoint.build_classifier(checkpoint.load(Path(context.artifacts["checkpoint"]))).eval()

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        import torch

        x = np.asarray(model_input)
        if x.ndim == 3:
            x = x[:, None]
        x = torch.as_tensor(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32))
        with torch.no_grad():
            probs = torch.softmax(self.clf(x), dim=1).numpy()
        out = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.classes])
        out.insert(0, "label", [self.classes[i] for i in probs.argmax(1)])
        out.insert(0, "class", probs.argmax(1).astype(np.int64))
        return out


def requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVE_PACKAGES]


def log_to(run, name: str, path: Path, classes, example: np.ndarray, tags: dict):
    """Checkpoint `path` as pyfunc model `name` of stage run `run` (a `tracking.StageRun`); its
    ModelInfo, or None where the run logs nothing."""
    from .signals import held

    if run.mlflow is None:
        return None
    with held():
        return log_classifier(run.mlflow, name, path, list(classes), example, tags)


def register_from(run, registry_name: str, name: str, path: Path, classes, example, dev_acc: float, tags: dict):
    """Log checkpoint `path` as a model of stage run `run` and register it (`register_champion`)."""
    from .signals import held

    info = log_to(run, name, path, classes, example, tags)
    if info is None:
        return None
    with held():
        return register_champion(run.mlflow, registry_name, info.model_uri, dev_acc, tags)


def log_classifier(mlflow, name: str, path: Path, classes: list[str], example: np.ndarray, tags: dict):
    """Log checkpoint `path` as pyfunc model `name` in the active run; returns its ModelInfo."""
    example = np.ascontiguousarray(example[:2])
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=__file__,
        artifacts={"checkpoint": str(path)},
        code_paths=[str(PACKAGE_DIR)],
        model_config={"classes": list(classes)},
        signature=signature(example, classes),
        input_example=example,
        pip_requirements=requirements(),
        tags=tags,
    )


def signature(example: np.ndarray, classes: list[str]):
    """Images of the example's shape and dtype in; class, label and one probability per class out.
    Declared, not inferred, so the schema says what the model promises (a class index is a long)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))])
    outputs = Schema(
        [ColSpec("long", "class"), ColSpec("string", "label"), *(ColSpec("double", f"p_{c}") for c in classes)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def register_champion(mlflow, registry_name: str, model_uri: str, dev_acc: float, tags: dict) -> dict:
    """Register `model_uri` as a new version of `registry_name` tagged with its `dev_acc` (accuracy
    on the held-out dev slice of its own label budget); move the alias `champion` to it only when
    that beats the current champion's recorded dev accuracy (a version without one, from an older
    maepipe, is replaced). Two dev slices are two unbiased estimates of accuracy on the same data,
    and neither was read by any other choice. Returns what happened, for the stage's log line."""
    import contextlib
    import io
    import os

    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    # MLflow prints "Successfully registered ..." / "Created version ..." itself; the stage says
    # what happened in its own line (MAEPIPE_VERBOSE=1 keeps MLflow's).
    hush = os.environ.get("MAEPIPE_VERBOSE") != "1"
    with contextlib.redirect_stderr(io.StringIO()) if hush else contextlib.nullcontext():
        version = mlflow.register_model(model_uri, registry_name, tags={**tags, "dev_acc": f"{dev_acc:.6f}"})
    try:
        current = client.get_model_version_by_alias(registry_name, "champion")
    except MlflowException:
        current = None
    champion_acc = float(current.tags["dev_acc"]) if current is not None and "dev_acc" in current.tags else None
    promoted = current is None or champion_acc is None or dev_acc > champion_acc
    if promoted:
        client.set_registered_model_alias(registry_name, "champion", version.version)
    return {
        "version": version.version,
        "dev_acc": dev_acc,
        "champion_version": version.version if promoted else current.version,
        "previous_dev_acc": champion_acc,
        "promoted": promoted,
    }


if __name__.startswith("code_model_"):  # MLflow executing this file to build the logged model
    import mlflow.models

    mlflow.models.set_model(ClassifierModel())
