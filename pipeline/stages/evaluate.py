"""Stage `evaluate`: test-split accuracy, ROC-AUC (per class, macro, micro), ROC curves,
confusion matrices and a figure of predictions, for the probed and fine-tuned MAE encoder and
the two controls: the same classifier trained from scratch, and a probe on a random encoder."""
import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve
from sklearn.preprocessing import label_binarize

from .. import checkpoint, data, engine, report, tracking
from ..params import Params
from . import DOWNSTREAM_DATA, IMAGES, METRICS, MODELS, PLOTS, REPORTS

MODELS_EVALUATED = ("finetune", "probe", "scratch", "probe_random")
PREDICTION_IMAGES = 12
# ROC curves go to DVC on one shared false-positive-rate grid (one column per class), denser
# near zero where good classifiers do all their climbing.
FPR_GRID = np.unique(np.concatenate([np.linspace(0, 1, 101), np.logspace(-4, -1, 31)]))


def scores(y: np.ndarray, probs: np.ndarray, classes) -> tuple[dict, dict]:
    """-> (metrics, curves[label] = (fpr, tpr, auc)) for one model."""
    k = len(classes)
    onehot = label_binarize(y, classes=list(range(k)))
    per_class, curves = {}, {}
    for c, name in enumerate(classes):
        if onehot[:, c].min() == onehot[:, c].max():
            continue  # a class absent from a (tiny) test split has no ROC curve
        fpr, tpr, _ = roc_curve(onehot[:, c], probs[:, c])
        per_class[name] = float(roc_auc_score(onehot[:, c], probs[:, c]))
        curves[name] = (fpr, tpr, per_class[name])
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    micro = float(roc_auc_score(onehot, probs, average="micro"))
    curves["micro"] = (fpr, tpr, micro)
    metrics = {"accuracy": float(accuracy_score(y, probs.argmax(1))),
               "auc_macro": float(np.mean(list(per_class.values()))), "auc_micro": micro,
               "auc_per_class": per_class}
    return metrics, curves


def run(p: Params) -> None:
    device = engine.setup(p.device, p.seed)
    d = data.load_prepared(DOWNSTREAM_DATA)
    classes = [str(c) for c in d["classes"]]
    x_test = engine.to_device(d["x_test"], device)
    y_test = d["y_test"]
    # Load and score both models before writing anything: a missing checkpoint leaves no half report.
    classifiers = {name: checkpoint.build_classifier(checkpoint.load(MODELS / f"{name}.pt")).to(device).eval()
                   for name in MODELS_EVALUATED}
    params = {"seed": p.seed, "device": p.device, "downstream.dataset": p.downstream_dataset,
              "downstream.image_size": p.downstream_size}
    with tracking.start(p.mlflow.experiment, "evaluate", params, p.downstream_dataset) as run:
        results, all_curves, cms, preds = {}, {}, {}, {}
        for name, clf in classifiers.items():
            probs = torch.softmax(engine.predict(clf, x_test, 512, device), dim=1).cpu().numpy().astype(np.float64)
            results[name], all_curves[name] = scores(y_test, probs, classes)
            preds[name] = probs.argmax(1)
            cms[name] = confusion_matrix(y_test, preds[name], labels=list(range(len(classes))))
        for name in classifiers:
            rows = [{"fpr": f, **{label: float(np.interp(f, c[0], c[1])) for label, c in all_curves[name].items()}}
                    for f in FPR_GRID]
            report.write_csv(rows, PLOTS / "evaluate" / f"roc_{name}.csv")
            report.write_csv([{"actual": classes[a], "predicted": classes[b]} for a, b in zip(y_test, preds[name])],
                             PLOTS / "evaluate" / f"confusion_{name}.csv")
            run.log_metrics({f"{name}_{k}": v for k, v in results[name].items() if k != "auc_per_class"})
        report.write_json(results, METRICS / "evaluate.json")
        summary = [{"model": name, "accuracy": r["accuracy"], "auc_macro": r["auc_macro"], "auc_micro": r["auc_micro"]}
                   for name, r in results.items()]
        report.write_markdown_table(summary, REPORTS / "evaluate.md",
                                    f"Test split of {p.downstream_dataset} ({len(y_test)} images, "
                                    f"{p.downstream_size}x{p.downstream_size})")
        report.roc_figure(all_curves, IMAGES / "roc.png")
        report.confusion_figure(cms, classes, IMAGES / "confusion.png")
        pick = np.random.default_rng(p.seed).choice(len(y_test), size=min(PREDICTION_IMAGES, len(y_test)), replace=False)
        report.predictions_figure(d["x_test"][pick] / 255.0, y_test[pick], {k: v[pick] for k, v in preds.items()},
                                  classes, IMAGES / "predictions.png")
        for name in ("roc.png", "confusion.png", "predictions.png"):
            run.log_artifact(IMAGES / name)
        run.log_artifact(REPORTS / "evaluate.md")
