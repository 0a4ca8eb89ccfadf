"""Stage `evaluate`: every arm's repetitions on the downstream test split (accuracy, per-class
one-vs-rest ROC-AUC, macro and micro AUC), a logistic regression on raw pixels fitted on each
repetition's training labels with its regularisation cross-validated inside them (the floor every
arm is shown against), and the paired comparisons that answer "what did MAE pretraining buy": the
difference in accuracy with a 95 % bootstrap CI over test images and repetitions (each one a
pretraining run and a label subset, so both noises are inside it), and McNemar's exact test per
repetition. The registry's candidate is chosen on the repetitions' held-out dev labels, never on
val. Every per-image prediction is written out, so every number here can be recomputed from the
repository."""

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve
from sklearn.preprocessing import label_binarize

from .. import checkpoint, figures, fsutil, loop, prepared, repetition, report, runtime, serving, stats, tracking
from ..errors import UserError
from ..params import Params
from . import DOWNSTREAM_DATA, IMAGES, METRICS, PLOTS, REPETITIONS, REPORTS, arm_path
from .budget import draw_key

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
# The classifiers that may become the registered model: never a control. Chosen on the repetitions'
# dev labels (inside the budget), never on val or test.
CANDIDATES = ("finetune", "probe")
# The pixel floor's inverse regularisation strengths, chosen by stratified k-fold CV on each
# repetition's training labels (at most CV_PER_CLASS of each class take part in the CV).
PIXEL_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PIXEL_FOLDS = 5
CV_PER_CLASS = 500
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


def pixel_floor(d: dict, chosen: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """(test-set class probabilities, the C chosen) of a multinomial logistic regression on raw
    pixels in [0, 1], fitted on the labelled images the arms got, its C chosen by stratified k-fold
    CV on (a class-balanced sample of at most CV_PER_CLASS per class of) those same labels."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0
    y = d["y_train"][chosen]
    rng = np.random.default_rng([seed, 3])
    sample = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:CV_PER_CLASS] for c in np.unique(y)]))
    folds = min(PIXEL_FOLDS, int(np.bincount(y[sample]).min()))
    if folds >= 2:
        # The regularisation path with warm starts, fold by fold: seconds, where a grid of
        # separate fits takes minutes. Accuracy is the score, as for every arm.
        search = LogisticRegressionCV(
            Cs=list(PIXEL_CS),
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring="accuracy",
            l1_ratios=(0.0,),
            use_legacy_attributes=False,
            max_iter=2000,
        )
        search.fit(flat(d["x_train"][chosen[sample]]), y[sample])
        c = float(search.C_)
    else:  # a class with a single label: nothing to hold out, sklearn's default
        c = 1.0
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit(flat(d["x_train"][chosen]), y)
    probs = np.zeros((len(d["y_test"]), len(d["classes"])))
    probs[:, model.classes_] = model.predict_proba(flat(d["x_test"]))
    return probs, c


def summarise(per_rep: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "auc_macro", "auc_micro"):
        out[f"{key}_mean"], out[f"{key}_sd"] = stats.mean_sd([s[key] for s in per_rep])
    out["repetitions"] = [{k: s[k] for k in ("accuracy", "auc_macro", "auc_micro")} for s in per_rep]
    out["auc_per_class"] = per_rep[0]["auc_per_class"]  # the first repetition's, for the ROC figure
    return out


def compare(correct: dict, a: str, b: str, seed: int) -> dict:
    """The paired difference a - b: bootstrap CI over repetitions and test images, the sd of the
    per-repetition differences, and McNemar's exact p per repetition."""
    boot = stats.paired_bootstrap(correct[a], correct[b], seed=seed)
    per_rep = (correct[a].mean(1) - correct[b].mean(1)).tolist()
    tests = [stats.mcnemar(ra, rb) for ra, rb in zip(correct[a], correct[b])]
    return {
        **boot,
        "per_repetition": per_rep,
        "sd": stats.mean_sd(per_rep)[1],
        "mcnemar_p": [t["p"] for t in tests],
        "mcnemar_p_max": max(t["p"] for t in tests),
    }


def headline(summary: dict, cells: str) -> dict:
    """The few numbers runs are compared by (`dvc exp show`'s table, the MLflow parent run): the
    repetitions' cells, the label budget, the number of repetitions (= pretraining runs), each arm's
    mean test accuracy, and what pretraining bought in points with its 95 % CI. Names are unique
    among the metrics files, so `dvc exp show` prints them bare and one screen holds them."""
    out = {"encoder": cells, "budget": summary["labels_per_class"], "reps": len(summary["repetitions"])}
    names = {"pixels_logreg": "pixels"}
    # The random-encoder probe is in `probe-rand`; its own accuracy would only widen the table.
    out.update(
        {
            names.get(arm, arm): round(r["accuracy_mean"], 4)
            for arm, r in summary["arms"].items()
            if arm != "probe_random"
        }
    )
    for name, short in (
        ("finetune-scratch", "ft-scratch"),
        ("probe-probe_random", "probe-rand"),
        ("finetune-pixels_logreg", "ft-pixels"),
    ):
        c = summary["comparisons"][name]
        out[short] = round(100 * c["diff"], 2)
        out[f"{short}_ci"] = f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}]"
    return out


def run(p: Params) -> None:
    device = runtime.setup(p.device, p.seed)
    d = prepared.load_prepared(DOWNSTREAM_DATA)
    classes = [str(c) for c in d["classes"]]
    x_test = runtime.to_device(d["x_test"], device)
    y_test = d["y_test"]
    reps = repetition.load(REPETITIONS, draw_key(p))
    # Load and score every checkpoint before writing anything: a missing one leaves no half report.
    probs, candidates, cells = _predict_arms(d, x_test, reps, device)
    probs[PIXELS], pixel_cs = _pixel_probs(d, reps)

    results, curves, preds = _score_arms(probs, y_test, classes)
    results[PIXELS]["C"] = pixel_cs
    correct = {arm: preds[arm] == y_test[None] for arm in preds}
    comparisons = {f"{a}-{b}": compare(correct, a, b, p.seed) for a, b in COMPARISONS}
    summary = {
        "test_images": int(len(y_test)),
        "labels_per_class": p.downstream.labels_per_class,
        "labels": int(len(reps[0].train)),
        "dev_labels": int(len(reps[0].dev)),
        "repetitions": [{"k": r.k, "seed": r.seed, "cell": c} for r, c in zip(reps, cells)],
        "pretraining_runs": len(reps),
        "arms": results,
        "comparisons": comparisons,
    }
    cell = ",".join(cells)

    params = {
        "seed": p.seed,
        "repetitions": list(p.repetitions),
        "device": p.device,
        "downstream.dataset": p.downstream_dataset,
        "downstream.image_size": p.downstream_size,
        "downstream.labels_per_class": p.downstream.labels_per_class,
        "downstream.dev_fraction": p.downstream.dev_fraction,
    }
    with tracking.start(p.mlflow.experiment, "evaluate", params, p.downstream_dataset) as run:
        run.log_dataset(DOWNSTREAM_DATA, f"{p.downstream_dataset}-downstream", "evaluation")
        _write_arm_plots(run, curves, preds, results, classes, y_test)
        for name, c in comparisons.items():
            run.log_metrics({f"{name}_{k}": c[k] for k in ("diff", "ci_low", "ci_high", "mcnemar_p_max")})
        _write_predictions(preds, y_test, [r.k for r in reps])
        report.write_json(summary, METRICS / "evaluate.json")
        report.write_json(headline(summary, cell), METRICS / "summary.json")
        _write_report(summary, p, REPORTS / "evaluate.md")
        _write_figures(d, curves, preds, classes, p.seed)
        for name in ("roc.png", "confusion.png", "predictions.png"):
            run.log_artifact(IMAGES / name)
        run.log_artifact(REPORTS / "evaluate.md")
        run.log_artifact(PLOTS / "evaluate" / "predictions.csv")
        _register(run, p, d, candidates)
        top = headline(summary, cell)
        run.summarise_parent(
            {k: str(v) for k, v in top.items() if not isinstance(v, float)},
            {k: v for k, v in top.items() if isinstance(v, float)},
        )
        run.note_not_run(_stage_runs(p, cells))
    for name, c in comparisons.items():
        print(
            f"evaluate: {name} {100 * c['diff']:+.2f} points [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] "
            f"(test, {len(reps)} repetitions)"
        )


def _predict_arms(d: dict, x_test: torch.Tensor, reps: list, device) -> tuple[dict, dict, list[str]]:
    """-> (test probabilities per arm and repetition, the registry's candidates as (arm, repetition)
    -> {dev_acc, path}, each repetition's cell), from every arm's checkpoints."""
    probs = {arm: [] for arm in ARMS}
    candidates, cells = {}, []
    for arm in ARMS:
        for rep in reps:
            path = arm_path(arm, rep.k)
            ckpt = checkpoint.load(path)
            if ckpt["meta"].get("repetition") != rep.k or ckpt["meta"].get("labels") != len(rep.train):
                raise UserError(f"evaluate: {path} was trained for another repetition; run `dvc repro`")
            if arm == ARMS[0]:
                cells.append(ckpt["meta"]["cell"])
            clf = checkpoint.build_classifier(ckpt).to(device).eval()
            logits = loop.predict(clf, x_test, 512, device)
            probs[arm].append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64))
            if arm in CANDIDATES:
                # Scored by the arm on the repetition's dev labels when it trained: no label read here.
                candidates[arm, rep.k] = {
                    "dev_acc": float(ckpt["meta"]["dev_acc"]),
                    "dev_images": int(len(rep.dev)),
                    "path": path,
                    "seed": rep.seed,
                }
    return probs, candidates, cells


def _pixel_probs(d: dict, reps: list) -> tuple[list[np.ndarray], list[float]]:
    """-> the pixel floor's test probabilities and chosen C, one per repetition."""
    fits = [pixel_floor(d, rep.train, rep.seed) for rep in reps]
    return [f[0] for f in fits], [f[1] for f in fits]


def _score_arms(probs: dict, y_test: np.ndarray, classes: list[str]) -> tuple[dict, dict, dict]:
    """-> (summary metrics per arm, the first repetition's ROC curves per arm, predicted classes
    per arm as a (repetition, image) array)."""
    results, curves, preds = {}, {}, {}
    for arm, runs in probs.items():
        per_rep = []
        for k, pr in enumerate(runs):
            metrics, c = scores(y_test, pr, classes)
            per_rep.append(metrics)
            if k == 0:
                curves[arm] = c
        results[arm] = summarise(per_rep)
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


def _write_predictions(preds: dict, y_test: np.ndarray, ks: list[int]) -> None:
    """Writes PLOTS/evaluate/predictions.csv: every repetition's prediction for every test image."""
    # Every repetition's prediction for every test image: the intervals can be recomputed from this.
    table = [
        {
            "image": i,
            "label": int(y_test[i]),
            **{f"{arm}_r{k}": int(preds[arm][j, i]) for arm in preds for j, k in enumerate(ks)},
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


def _stage_runs(p: Params, cells: list[str]) -> dict[str, dict]:
    """Every MLflow stage run one invocation of the pipeline makes, by name, with the numbers of
    the metrics file its stage leaves (so a stage DVC did not run still shows what it stands for)."""
    from ..params import cell_name

    def numbers(rel: str) -> dict:
        path = METRICS / rel
        raw = report.read_json(path) if path.is_file() else {}
        return {k: v for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    runs = {"data": {}}
    runs.update({f"pretrain-{c}": numbers(f"pretrain/{c}.json") for c in (cell_name(*pm) for pm in p.cells())})
    runs[f"select-{','.join(cells)}"] = numbers("select.json")
    runs.update({f"pretrain_full-r{k}-{c}": numbers(f"pretrain_full/r{k}.json") for k, c in zip(p.repetitions, cells)})
    # The arms are named by their repetitions' cells; the controls by the patch sizes they copy.
    arms_cell = ",".join(sorted(set(cells)))
    patches = ",".join(sorted({c.split("-")[0] for c in cells}))
    runs.update({f"{arm}-{arms_cell}": numbers(f"{arm}.json") for arm in ("finetune", "probe")})
    runs.update({f"{arm}-{patches}": numbers(f"{arm}.json") for arm in ("scratch", "probe_random")})
    return runs


def _register(run, p: Params, d: dict, candidates: dict) -> None:
    """The candidate with the best dev accuracy (each scored on its own repetition's held-out budget
    labels) becomes a version of `maepipe-<dataset>`, and the champion when its dev accuracy beats
    the current champion's. Nothing here is written to the repository: the registry's state depends
    on the store's history, not only on this run."""
    arm, k = max(candidates, key=lambda ak: (candidates[ak]["dev_acc"], ak[0] == "finetune", -ak[1]))
    c = candidates[arm, k]
    ckpt = checkpoint.load(c["path"])
    tags = {
        "arm": arm,
        "repetition": str(k),
        "seed": str(c["seed"]),
        "cell": ckpt["meta"]["cell"],
        "labels_per_class": str(p.downstream.labels_per_class),
        "dev_images": str(c["dev_images"]),
        "checkpoint": str(c["path"]),
        "checkpoint_md5": fsutil.md5(c["path"]),
        **tracking.provenance(),
    }
    outcome = serving.register_from(
        run,
        f"maepipe-{p.downstream_dataset}",
        f"candidate-{arm}-r{k}",
        c["path"],
        [str(x) for x in d["classes"]],
        d["x_val"][:2],
        c["dev_acc"],
        tags,
    )
    if outcome:
        verdict = "now the champion" if outcome["promoted"] else f"champion stays version {outcome['champion_version']}"
        print(
            f"registered maepipe-{p.downstream_dataset} version {outcome['version']} ({arm} repetition {k}, "
            f"dev acc {c['dev_acc']:.4f}): {verdict}"
        )


def _write_report(summary: dict, p: Params, path) -> None:
    n, reps = summary["test_images"], len(summary["repetitions"])
    arms = [
        {
            "arm": arm,
            "test accuracy (mean ± sd)": f"{r['accuracy_mean']:.4f} ± {r['accuracy_sd']:.4f}",
            "macro AUC": f"{r['auc_macro_mean']:.4f} ± {r['auc_macro_sd']:.4f}",
            "per repetition": " / ".join(f"{s['accuracy']:.4f}" for s in r["repetitions"]),
        }
        for arm, r in summary["arms"].items()
    ]
    comps = [
        {
            "comparison": name,
            "accuracy difference": f"{c['diff'] * 100:+.2f} points",
            "95 % CI": f"[{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]",
            "sd over repetitions": f"{c['sd'] * 100:.2f}",
            "McNemar p per repetition": " / ".join(f"{x:.2g}" for x in c["mcnemar_p"]),
        }
        for name, c in summary["comparisons"].items()
    ]
    cells = ", ".join(f"r{r['k']}: {r['cell']}" for r in summary["repetitions"])
    report.write_markdown_table(
        arms,
        path,
        f"Test split of {p.downstream_dataset} ({n} images, {p.downstream_size}x{p.downstream_size}); "
        f"{reps} repetitions, each its own pretraining run and label subset ({cells}); "
        f"{p.downstream.labels_per_class} labels per class, of which {summary['labels']} train every arm and "
        f"the pixel floor and {summary['dev_labels']} are held out for the run's choices",
        extra=[("Paired differences (bootstrap over test images and repetitions)", comps)],
    )
