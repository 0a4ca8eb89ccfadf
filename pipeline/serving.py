"""A downstream classifier as an MLflow model: `mlflow.pyfunc.load_model(uri)` or
`mlflow models serve` take images as users have them and return classes.

The model is a pyfunc around the stage's checkpoint: the checkpoint is its artifact and the
`pipeline` package travels with it (`code_paths`), so it loads in any process and directory where
torch and mlflow are installed, without this repository. Input: uint8 images (0-255) or floats in
[0, 1], shaped (N, C, H, W) or (N, H, W) for one channel, at the downstream size; the encoder
normalises them itself (its mean and std are in its config). Output: one row per image with the
class index, its name and the probability of each class."""

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

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
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


def log_classifier(mlflow, name: str, path: Path, classes: list[str], example: np.ndarray, tags: dict):
    """Log checkpoint `path` as pyfunc model `name` in the active run; returns its ModelInfo."""
    from mlflow.models import infer_signature

    model = ClassifierModel()
    example = np.ascontiguousarray(example[:2])
    signature = infer_signature(example, _predict_once(path, classes, example))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=model,
        artifacts={"checkpoint": str(path)},
        code_paths=[str(PACKAGE_DIR)],
        model_config={"classes": list(classes)},
        signature=signature,
        input_example=example,
        pip_requirements=requirements(),
        tags=tags,
    )


def _predict_once(path: Path, classes: list[str], example: np.ndarray) -> pd.DataFrame:
    class _Context:
        artifacts = {"checkpoint": str(path)}
        model_config = {"classes": list(classes)}

    model = ClassifierModel()
    model.load_context(_Context())
    return model.predict(_Context(), example)


def val_accuracy(model, x_val: np.ndarray, y_val: np.ndarray) -> float | None:
    """Accuracy of a loaded pyfunc model on the val split; None when it cannot read these images
    (a champion of another image size or channel count)."""
    try:
        pred = model.predict(x_val)["class"].to_numpy()
    except Exception:  # noqa: BLE001 - any failure means "not comparable on this split"
        return None
    return float((pred == y_val).mean())


def register_champion(mlflow, registry_name: str, model_uri: str, x_val, y_val, tags: dict) -> dict:
    """Register `model_uri` as a new version of `registry_name`; move the alias `champion` to it
    only when it beats the current champion on this val split (both scored here, the same way).
    Returns what happened, for the stage's log line."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    candidate = val_accuracy(mlflow.pyfunc.load_model(model_uri), x_val, y_val)
    version = mlflow.register_model(model_uri, registry_name, tags={**tags, "val_acc": f"{candidate:.6f}"})
    try:
        current = client.get_model_version_by_alias(registry_name, "champion")
    except MlflowException:
        current = None
    champion_acc = None
    if current is not None:
        champion_acc = val_accuracy(mlflow.pyfunc.load_model(f"models:/{registry_name}@champion"), x_val, y_val)
    promoted = current is None or (champion_acc is not None and candidate > champion_acc)
    if promoted:
        client.set_registered_model_alias(registry_name, "champion", version.version)
    return {
        "version": version.version,
        "val_acc": candidate,
        "champion_version": version.version if promoted else current.version,
        "previous_val_acc": champion_acc,
        "promoted": promoted,
    }
