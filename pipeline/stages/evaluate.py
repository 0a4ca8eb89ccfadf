"""Stage `evaluate`: every arm's repetitions on the downstream test split (accuracy, per-class
one-vs-rest ROC-AUC, macro and micro AUC), a logistic regression on raw pixels with the same labels
(the floor every arm is shown against), and the paired comparisons that answer "what did MAE
pretraining buy": the difference in accuracy with a 95 % bootstrap CI over test images and seeds,
and McNemar's exact test per seed. Every per-image prediction is written out, so every number here
can be recomputed from the repository."""

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve
from sklearn.preprocessing import label_binarize

from .. import checkpoint, data, figures, fsutil, loop, report, runtime, stats, tracking
from ..params import Params
from . import DOWNSTREAM_DATA, IMAGES, METRICS, PLOTS, REPORTS, arm_path

ARMS = ("finetune", "scratch", "probe", "probe_random")
PIXELS = "pixels_logreg"
# (pretrained, control): the differences the run exists to measure, then each against the floor.
COMPARISONS = (
    ("finetune", "scratch"),
    ("probe", "probe_random"),
    ("finetune", PIXELS),
    ("probe", PIXELS),
    ("scratch", PIXELS),
)
PREDICTION_IMAGES = 12
# The classifiers that may become the registered model: never a control. Chosen on val, not test.
CANDIDATES = ("finetune", "probe")
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
    metrics = {
        "accuracy": float(accuracy_score(y, probs.argmax(1))),
        "auc_macro": float(np.mean(list(per_class.values()))),
        "auc_micro": micro,
        "auc_per_class": per_class,
    }
    return metrics, curves


def pixel_floor(d: dict, chosen: np.ndarray, seed: int) -> np.ndarray:
    """Test-set class probabilities of a multinomial logistic regression on raw pixels in [0, 1],
    fitted on the same labelled images the arms got."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0
    model = LogisticRegression(max_iter=2000, random_state=seed)
    model.fit(flat(d["x_train"][chosen]), d["y_train"][chosen])
    probs = np.zeros((len(d["y_test"]), len(d["classes"])))
    probs[:, model.classes_] = model.predict_proba(flat(d["x_test"]))
    return probs


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "auc_macro", "auc_micro"):
        out[f"{key}_mean"], out[f"{key}_sd"] = stats.mean_sd([s[key] for s in per_seed])
    out["seeds"] = [{k: s[k] for k in ("accuracy", "auc_macro", "auc_micro")} for s in per_seed]
    out["auc_per_class"] = per_seed[0]["auc_per_class"]  # the first repetition's, for the ROC figure
    return out


def compare(correct: dict, a: str, b: str, seed: int) -> dict:
    boot = stats.paired_bootstrap(correct[a], correct[b], seed=seed)
    tests = [stats.mcnemar(ra, rb) for ra, rb in zip(correct[a], correct[b])]
    return {**boot, "mcnemar_p": [t["p"] for t in tests], "mcnemar_p_max": max(t["p"] for t in tests)}


def headline(summary: dict, cell: str) -> dict:
    """The few numbers runs are compared by (`dvc exp show`'s table, the MLflow parent run): the
    encoder's cell, the label budget, each arm's mean test accuracy, and what pretraining bought in
    points with its 95 % CI. Names are unique among the metrics files, so `dvc exp show` prints
    them bare and one screen holds them."""
    out = {"encoder": cell, "budget": summary["labels_per_class"]}
    names = {"pixels_logreg": "pixels"}
    out.update({names.get(arm, arm): round(r["accuracy_mean"], 4) for arm, r in summary["arms"].items()})
    for name, short in (("finetune-scratch", "ft-scratch"), ("probe-probe_random", "probe-rand")):
        c = summary["comparisons"][name]
        out[short] = round(100 * c["diff"], 2)
        out[f"{short}_ci"] = f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"
    return out


def run(p: Params) -> None:
    device = runtime.setup(p.device, p.seed)
    d = data.load_prepared(DOWNSTREAM_DATA)
    classes = [str(c) for c in d["classes"]]
    x_test = runtime.to_device(d["x_test"], device)
    y_test = d["y_test"]
    seeds = p.downstream_seeds()
    # Load and score every checkpoint before writing anything: a missing one leaves no half report.
    probs, val_acc, cell = _predict_arms(d, x_test, len(seeds), device)
    budgets = [data.label_budget(d["y_train"], p.downstream.labels_per_class, s, d["classes"]) for s in seeds]
    probs[PIXELS] = _pixel_probs(d, budgets, seeds)

    results, curves, preds = _score_arms(probs, y_test, classes)
    correct = {arm: preds[arm] == y_test[None] for arm in preds}
    comparisons = {f"{a}-{b}": compare(correct, a, b, p.seed) for a, b in COMPARISONS}
    summary = {
        "test_images": int(len(y_test)),
        "labels_per_class": p.downstream.labels_per_class,
        "labels": int(len(budgets[0])),
        "seeds": seeds,
        "arms": results,
        "comparisons": comparisons,
    }

    params = {
        "seed": p.seed,
        "device": p.device,
        "downstream.dataset": p.downstream_dataset,
        "downstream.image_size": p.downstream_size,
        "downstream.labels_per_class": p.downstream.labels_per_class,
        "downstream.seeds": len(seeds),
    }
    with tracking.start(p.mlflow.experiment, "evaluate", params, p.downstream_dataset) as run:
        run.log_dataset(DOWNSTREAM_DATA, f"{p.downstream_dataset}-downstream", "evaluation")
        _write_arm_plots(run, curves, preds, results, classes, y_test)
        for name, c in comparisons.items():
            run.log_metrics({f"{name}_{k}": c[k] for k in ("diff", "ci_low", "ci_high", "mcnemar_p_max")})
        _write_predictions(preds, y_test, len(seeds))
        report.write_json(summary, METRICS / "evaluate.json")
        report.write_json(headline(summary, cell), METRICS / "summary.json")
        _write_report(summary, p, REPORTS / "evaluate.md")
        _write_figures(d, curves, preds, classes, p.seed)
        for name in ("roc.png", "confusion.png", "predictions.png"):
            run.log_artifact(IMAGES / name)
        run.log_artifact(REPORTS / "evaluate.md")
        run.log_artifact(PLOTS / "evaluate" / "predictions.csv")
        _register(run, p, d, cell, seeds, val_acc)
        top = headline(summary, cell)
        run.summarise_parent(
            {k: str(v) for k, v in top.items() if not isinstance(v, float)},
            {k: v for k, v in top.items() if isinstance(v, float)},
        )
        run.note_not_run(_stage_runs(p, cell))


def _predict_arms(d: dict, x_test: torch.Tensor, n_seeds: int, device) -> tuple[dict, dict, str]:
    """-> (test probabilities per arm and repetition, val accuracy per candidate (arm, repetition),
    the encoder's cell), from every arm's checkpoints."""
    probs = {arm: [] for arm in ARMS}
    x_val = runtime.to_device(d["x_val"], device)
    val_acc = {}  # (arm, repetition) -> val accuracy: how the registry's candidate is chosen
    for arm in ARMS:
        for k in range(n_seeds):
            ckpt = checkpoint.load(arm_path(arm, k))
            cell = ckpt["meta"]["cell"]
            clf = checkpoint.build_classifier(ckpt).to(device).eval()
            logits = loop.predict(clf, x_test, 512, device)
            probs[arm].append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
            if arm in CANDIDATES:
                val_pred = loop.predict(clf, x_val, 512, device).argmax(1).cpu().numpy()
                val_acc[arm, k] = float((val_pred == d["y_val"]).mean())
    return probs, val_acc, cell


def _pixel_probs(d: dict, budgets: list[np.ndarray], seeds: list[int]) -> list[np.ndarray]:
    """-> the pixel floor's test probabilities, one per seed."""
    # lbfgs draws no random numbers, so seeds that share a label subset (every seed, under
    # `labels_per_class: all`) share one fit: minutes on 54,000 images, not one per seed.
    fits, out = {}, []
    for chosen, s in zip(budgets, seeds):
        if chosen.tobytes() not in fits:
            fits[chosen.tobytes()] = pixel_floor(d, chosen, s)
        out.append(fits[chosen.tobytes()])
    return out


def _score_arms(probs: dict, y_test: np.ndarray, classes: list[str]) -> tuple[dict, dict, dict]:
    """-> (summary metrics per arm, the first repetition's ROC curves per arm, predicted classes
    per arm as a (repetition, image) array)."""
    results, curves, preds = {}, {}, {}
    for arm, runs in probs.items():
        per_seed = []
        for k, pr in enumerate(runs):
            metrics, c = scores(y_test, pr, classes)
            per_seed.append(metrics)
            if k == 0:
                curves[arm] = c
        results[arm] = summarise(per_seed)
        preds[arm] = np.stack([pr.argmax(1) for pr in runs])
    return results, curves, preds


def _write_arm_plots(run, curves: dict, preds: dict, results: dict, classes: list[str], y_test: np.ndarray) -> None:
    """Writes each arm's ROC and confusion CSVs under PLOTS/evaluate and logs its summary metrics."""
    for arm in preds:
        rows = [
            {"fpr": f, **{label: float(np.interp(f, c[0], c[1])) for label, c in curves[arm].items()}} for f in FPR_GRID
        ]
        report.write_csv(rows, PLOTS / "evaluate" / f"roc_{arm}.csv")
        report.write_csv(
            [{"actual": classes[a], "predicted": classes[b]} for a, b in zip(y_test, preds[arm][0])],
            PLOTS / "evaluate" / f"confusion_{arm}.csv",
        )
        r = results[arm]
        run.log_metrics({f"{arm}_{k}": v for k, v in r.items() if k.endswith(("_mean", "_sd"))})


def _write_predictions(preds: dict, y_test: np.ndarray, n_seeds: int) -> None:
    """Writes PLOTS/evaluate/predictions.csv: every repetition's prediction for every test image."""
    # Every repetition's prediction for every test image: the intervals can be recomputed from this.
    table = [
        {
            "image": i,
            "label": int(y_test[i]),
            **{f"{arm}_s{k}": int(preds[arm][k, i]) for arm in preds for k in range(n_seeds)},
        }
        for i in range(len(y_test))
    ]
    report.write_csv(table, PLOTS / "evaluate" / "predictions.csv")


def _write_figures(d: dict, curves: dict, preds: dict, classes: list[str], seed: int) -> None:
    """Writes the ROC, confusion and sample-prediction figures of the arms to IMAGES."""
    y_test = d["y_test"]
    figures.roc_figure({a: curves[a] for a in ARMS}, IMAGES / "roc.png")
    cms = {arm: confusion_matrix(y_test, preds[arm][0], labels=list(range(len(classes)))) for arm in ARMS}
    figures.confusion_figure(cms, classes, IMAGES / "confusion.png")
    pick = np.random.default_rng(seed).choice(len(y_test), size=min(PREDICTION_IMAGES, len(y_test)), replace=False)
    figures.predictions_figure(
        d["x_test"][pick] / 255.0,
        y_test[pick],
        {a: preds[a][0][pick] for a in ARMS},
        classes,
        IMAGES / "predictions.png",
    )


def _stage_runs(p: Params, cell: str) -> dict[str, dict]:
    """Every MLflow stage run one invocation of the pipeline makes, by name, with the numbers of
    the metrics file its stage leaves (so a stage DVC did not run still shows what it stands for)."""
    from ..params import cell_name

    def numbers(rel: str) -> dict:
        path = METRICS / rel
        raw = report.read_json(path) if path.is_file() else {}
        return {k: v for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    runs = {"data": {}}
    runs.update({f"pretrain-{c}": numbers(f"pretrain/{c}.json") for c in (cell_name(*pm) for pm in p.cells())})
    runs[f"select-{cell}"] = numbers("select.json")
    runs[f"pretrain_full-{cell}"] = numbers("pretrain_full.json")
    runs.update({f"{arm}-{cell}": numbers(f"{arm}.json") for arm in ARMS})
    return runs


def _register(run, p: Params, d: dict, cell: str, seeds: list[int], val_acc: dict) -> None:
    """The best candidate on val becomes a version of `maepipe-<dataset>`, and the champion when
    it beats the current one on this val split. Nothing here is written to the repository: the
    registry's state depends on the store's history, not only on this run."""
    arm, k = max(val_acc, key=lambda ak: (val_acc[ak], ak[0] == "finetune", -ak[1]))
    path = arm_path(arm, k)
    tags = {
        "arm": arm,
        "seed": str(seeds[k]),
        "cell": cell,
        "labels_per_class": str(p.downstream.labels_per_class),
        "checkpoint": str(path),
        "checkpoint_md5": fsutil.md5(path),
        **tracking.provenance(),
    }
    outcome = run.register_champion(
        f"maepipe-{p.downstream_dataset}",
        f"candidate-{arm}-s{k}",
        path,
        [str(c) for c in d["classes"]],
        d["x_val"],
        d["y_val"],
        tags,
    )
    if outcome:
        verdict = "now the champion" if outcome["promoted"] else f"champion stays version {outcome['champion_version']}"
        print(
            f"registered maepipe-{p.downstream_dataset} version {outcome['version']} ({arm} seed {seeds[k]}, "
            f"val acc {outcome['val_acc']:.4f}): {verdict}"
        )


def _write_report(summary: dict, p: Params, path) -> None:
    n, seeds = summary["test_images"], len(summary["seeds"])
    arms = [
        {
            "arm": arm,
            "test accuracy (mean ± sd)": f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
            "macro AUC": f"{r['auc_macro_mean']:.4f} ± {r['auc_macro_sd']:.4f}",
            "per seed": " / ".join(f"{s['accuracy']:.4f}" for s in r["seeds"]),
        }
        for arm, r in summary["arms"].items()
    ]
    comps = [
        {
            "comparison": name,
            "accuracy difference": f"{c['diff'] * 100:+.2f} points",
            "95 % CI": f"[{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]",
            "McNemar p per seed": " / ".join(f"{x:.2g}" for x in c["mcnemar_p"]),
        }
        for name, c in summary["comparisons"].items()
    ]
    report.write_markdown_table(
        arms,
        path,
        f"Test split of {p.downstream_dataset} ({n} images, {p.downstream_size}x{p.downstream_size}); "
        f"{summary['labels']} labels ({p.downstream.labels_per_class} per class), {seeds} seeds",
        extra=[("Paired differences (bootstrap over test images and seeds)", comps)],
    )
