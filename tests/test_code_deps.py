"""Every stage's code deps in dvc.yaml are exactly the `pipeline` modules it can execute, so an
edit to any of them makes exactly the stages that run it stale."""

import json
import subprocess
import sys

import pytest
from conftest import REPS, ROOT, sh, tiny_params, write_params

sys.path.insert(0, str(ROOT / "tools"))
import codedeps  # noqa: E402


def test_dvc_yaml_lists_every_imported_module_and_nothing_else():
    assert codedeps.differences() == {}, "run `python tools/codedeps.py --write`"
    # Every stage: the entry point, its own module, and the modules every stage needs.
    for stage, files in codedeps.listed().items():
        assert {"pipeline/__init__.py", "pipeline/__main__.py", "pipeline/params.py"} <= set(files), stage


@pytest.mark.parametrize("stage", ["validate", "data", "pretrain", "select", "probe", "finetune", "evaluate"])
def test_the_static_graph_covers_what_a_stage_imports_at_run_time(stage):
    """An independent view: the modules loaded once a stage module is imported (module-level imports
    only, so a subset of the static graph, which also sees imports inside functions)."""
    code = (
        f"import sys, importlib; importlib.import_module('pipeline.stages.{stage}'); "
        "import pipeline.__main__; print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'pipeline'))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    files = {str(codedeps.module_file(m).relative_to(ROOT)) for m in loaded.stdout.split()}
    assert files <= set(codedeps.stage_deps(stage))
    assert f"pipeline/stages/{stage}.py" in files


def test_lazy_imports_count(tmp_path):
    """An import inside a function, relative at any depth, is still a dependency."""
    pkg = tmp_path / "pipeline"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("from . import errors\n")
    (pkg / "errors.py").write_text("")
    (pkg / "stats.py").write_text("import numpy\n")
    (pkg / "unused.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "evaluate.py").write_text("def run():\n    from .. import stats\n")
    assert codedeps.stage_deps("evaluate", tmp_path) == [
        "pipeline/__init__.py",
        "pipeline/__main__.py",
        "pipeline/errors.py",
        "pipeline/stages/__init__.py",
        "pipeline/stages/evaluate.py",
        "pipeline/stats.py",
    ]


def _stale(repo) -> set[str]:
    return set(json.loads(sh(["dvc", "status", "--json"], repo).stdout))


def test_editing_a_module_makes_exactly_its_importers_stale(repro_copy):
    repo = repro_copy
    assert _stale(repo) == set()
    deps = codedeps.expected(repo / "dvc.yaml")
    cells = {f"pretrain@{p}-{m}" for p in (4, 8) for m in (0.5, 0.75)}
    arms = {"probe", "probe_random", "finetune", "scratch"}
    fulls = {f"pretrain_full@{k}" for k in REPS}
    for module, importers in (
        ("pipeline/represent.py", {"select"}),
        ("pipeline/stages/arm.py", arms),
        # Only the stages that log or register models: no grid cell, no data, no pretraining run.
        ("pipeline/serving.py", arms | {"evaluate"}),
        # The model: not the checks (validate, budget) nor the data stage.
        ("pipeline/model.py", set(deps) - {"validate", "data", "budget", "pretrain", "pretrain_full"} | cells | fulls),
        ("pipeline/params.py", set(deps) - {"pretrain", "pretrain_full"} | cells | fulls),
    ):
        # The derived deps agree with what we know these modules do ...
        assert {s for s, files in deps.items() if module in files} == {s.split("@")[0] for s in importers}
        original = (repo / module).read_text()
        try:
            (repo / module).write_text(original + "\n# an edit\n")
            # ... and DVC, reading dvc.yaml, agrees with both.
            assert _stale(repo) == importers, module
        finally:
            (repo / module).write_text(original)
    assert _stale(repo) == set()


def test_the_controls_depend_on_the_selected_cell_not_the_pretrained_weights(repro_copy):
    """scratch and probe_random build a random encoder of the selected cell's architecture: longer
    pretraining changes every encoder, and re-runs neither."""
    repo = repro_copy
    write_params(repo, tiny_params(**{"pretrain_full.phases": [{"epochs": 3, "augment": []}]}))
    out = sh(["dvc", "repro"], repo).stdout
    for stage in ("pretrain_full@0", "pretrain_full@1", "probe", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    for stage in ("select", "scratch", "probe_random"):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
