"""The label budget, kept by every choice: every training label that `select`, the four arms, the
pixel floor and the registry's champion choice read lies inside that repetition's own budget.

The reads are instrumented, not the config: the stages run in-process on a repo that has run, with
the prepared data's training labels wrapped in an object that records every index it is asked
for and refuses any other use (a whole-array read, a comparison, a conversion). Drawing the
budgets (the `budget` stage) is the one step allowed to see every label; it is not run here."""

import numpy as np
import pytest
from conftest import REPS


class LabelReads:
    """Labels that log each indexed read. Anything that would read them all fails, or, with
    `whole_ok` (the val labels, which the arms read whole to report their curves), is logged as
    "all"."""

    def __init__(self, labels: np.ndarray, log: list, whole_ok: bool = False):
        self._labels, self._log, self._whole_ok = labels, log, whole_ok

    def _whole(self, what: str):
        if not self._whole_ok:
            raise AssertionError(f"every training label read at once ({what})")
        self._log.append("all")
        return self._labels

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        if idx.dtype == bool or idx.ndim != 1:
            raise AssertionError(f"labels read through a mask or a slice, not by index: {idx!r}")
        self._log.append(frozenset(idx.tolist()))
        return self._labels[idx]

    def __array__(self, dtype=None, copy=None):
        return self._whole("as an array")

    def __getattr__(self, name):
        return getattr(self._whole(f".{name}"), name)

    def __eq__(self, other):
        return self._whole("==") == other

    __hash__ = None
    __iter__ = None


def test_every_label_read_lies_in_its_repetitions_budget(repro_copy, monkeypatch):
    from pipeline import params, prepared, repetition
    from pipeline.stages import evaluate, finetune, probe, select

    repo = repro_copy
    monkeypatch.chdir(repo)
    reps = repetition.load(repo / "data" / "repetitions.json")
    p = params.load(repo / "params.yaml")
    real = prepared.load_prepared
    log: dict[str, list] = {}

    def run(stage, body):
        reads, val_reads = log.setdefault(stage, []), log.setdefault(f"{stage} val", [])

        def load(path):
            d = real(path)
            d["y_train"] = LabelReads(d["y_train"], reads)
            d["y_val"] = LabelReads(d["y_val"], val_reads, whole_ok=True)
            return d

        monkeypatch.setattr(prepared, "load_prepared", load)
        body()

    run("select", lambda: select.run(p))
    for init in ("pretrained", "random"):
        run(probe.NAMES[init], lambda init=init: probe.run(p, init))
        run(finetune.NAMES[init], lambda init=init: finetune.run(p, init))
    run("evaluate", lambda: evaluate.run(p))

    budget = {frozenset(r.budget.tolist()) for r in reps}
    train = {frozenset(r.train.tolist()) for r in reps}
    dev = {frozenset(r.dev.tolist()) for r in reps}
    # Each repetition chooses its cell on its whole budget, and on nothing else.
    assert set(log["select"]) == budget
    # Each arm fits on its repetition's training labels and scores its dev slice: nothing else.
    for arm in ("probe", "probe_random", "finetune", "scratch"):
        assert set(log[arm]) == train | dev, arm
    # The pixel floor fits (and cross-validates its C) on each repetition's training labels; the
    # champion is chosen on the dev accuracies the arms recorded, so evaluate reads no other label.
    assert set(log["evaluate"]) == train
    # Val is for reporting only: the choices (select, the champion) never read a val label.
    assert log["select val"] == [] and log["evaluate val"] == []
    assert len(reps) == len(REPS) and all(len(b) == 200 for b in budget)


def test_the_instrument_catches_a_whole_array_read():
    log = []
    labels = LabelReads(np.arange(10), log)
    assert labels[np.array([2, 3])].tolist() == [2, 3] and log == [frozenset({2, 3})]
    for bad in (lambda: np.bincount(labels), lambda: labels == 1, lambda: labels[labels_mask()]):
        with pytest.raises(AssertionError):
            bad()


def labels_mask():
    return np.ones(10, dtype=bool)
