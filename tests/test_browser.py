"""What a person sees, in a real browser: the MLflow UI on the store of a tiny real run, and the
`dvc plots diff` page between two experiments, opened from disk with no network.

Headless Chromium is Debian's `chromium` package driven by Playwright for Python (the PyPI wheel;
its own browser download is never used). Screenshots go to $MAEPIPE_TEST_ARTIFACTS (default
<repo>/test-artifacts). Every test here skips, saying what to install, where Chromium, Playwright
or web/plots-template.html (`npm ci --prefix web`) is missing; `make browser-deps` installs all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, ROOT, env, free_port, sh

TEMPLATE = ROOT / "web" / "plots-template.html"
INSTALL = "`make browser-deps` (as root) installs what the browser tests need"
# Root needs --no-sandbox; the rest keeps Chromium from calling out to Google's hosts (no network here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]
VIEWPORT = {"width": 1600, "height": 1000}
# DVC's linear template colours revisions with this range, in the order of the revisions.
REV_COLOURS = ["#945dd6", "#13adc7"]


def _chromium() -> str | None:
    for name in (os.environ.get("MAEPIPE_CHROMIUM"), "chromium", "chromium-browser", "/usr/lib/chromium/chromium"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            f"Playwright for Python is missing: `.venv/bin/pip install -r requirements.txt` "
            f"(playwright==1.65.2; never `playwright install`, Debian's chromium is used); {INSTALL}"
        )
    exe = _chromium()
    if exe is None:
        pytest.skip(
            f"no Chromium: `apt-get install -y chromium` (Debian's package), or point MAEPIPE_CHROMIUM "
            f"at a Chromium binary; {INSTALL}"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def plots_template() -> Path:
    if not TEMPLATE.is_file():
        pytest.skip(
            f"{TEMPLATE.relative_to(ROOT)} is missing: `npm ci --prefix web` installs Vega, Vega-Lite "
            f"and Vega-Embed into web/node_modules and builds it; {INSTALL}"
        )
    return TEMPLATE


@pytest.fixture(scope="module")
def built(pinned_template) -> Path:
    """The session's tiny `dvc repro` with its experiment `pinned` (the other patch size): its MLflow
    store holds both invocations. Read only."""
    return pinned_template[0]


@pytest.fixture(scope="module")
def pinned(pinned_template) -> Path:
    return pinned_template[0]


def _artifact(name: str) -> Path:
    folder = Path(os.environ.get("MAEPIPE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _screenshot(page, name: str, capsys) -> Path:
    path = _artifact(name)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


@contextlib.contextmanager
def _mlflow_ui(repo: Path):
    """`mlflow ui` on the repo's store, on a free port of 127.0.0.1; yields its URL once /health answers."""
    port = free_port()
    log_path = repo.parent / "mlflow-ui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "ui",
                "--backend-store-uri",
                f"sqlite:///{repo / 'mlflow.db'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=repo.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true"),
        )
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow ui exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with direct.open(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not answer /health in 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _page(browser, **context_options):
    """A new page that records console errors and uncaught exceptions in page.errors."""
    context = browser.new_context(viewport=VIEWPORT, **context_options)
    page = context.new_page()
    page.errors = []
    page.on("console", lambda m: page.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e}"))
    return page


# The card of one metric chart on MLflow's run page, scrolled into view: its text, the plotly plot's
# size, and each line it drew (its on-screen size and the number of vertices of its SVG path).
METRIC_CHART_JS = """(name) => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    let card = plot;
    while (card.parentElement && card.parentElement.querySelectorAll('.js-plotly-plot').length === 1)
      card = card.parentElement;
    if (card.innerText.trim().split('\\n')[0].trim() !== name) continue;
    card.scrollIntoView({block: 'nearest'});
    const box = plot.getBoundingClientRect();
    const lines = [...plot.querySelectorAll('.scatterlayer path.js-line')].map(p => {
      const b = p.getBoundingClientRect();
      return {width: b.width, height: b.height, vertices: (p.getAttribute('d').match(/[ML]/g) || []).length};
    });
    return {text: card.innerText, width: box.width, height: box.height, lines};
  }
  return null;
}"""


def test_mlflow_ui_lists_the_cells_and_draws_a_metric_chart(browser, built, capsys):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{built / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maepipe")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    parent = next(r for r in runs.values() if r.data.tags.get("maepipe.level") == "pipeline")
    run = runs["pretrain-p4-m0.5"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")]
    assert len(steps) >= 2

    with _mlflow_ui(built) as url:
        page = _page(browser)
        # Classic "Model training" view, MLflow Assistant panel closed (both only change the layout).
        page.context.add_init_script("""
            localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
            localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
            localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');""")

        # The experiment page: one row per pipeline invocation (the parent run), its stages nested
        # under it rather than listed flat beside it.
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
        page.get_by_role("link", name=parent.info.run_name, exact=True).wait_for(timeout=90_000)
        links = page.eval_on_selector_all("a[href*='/runs/']", "els => els.map(e => e.innerText.trim())")
        assert parent.info.run_name in links and not [n for n in links if n.startswith("pretrain-")], links
        assert "maepipe" in page.inner_text("body")
        _screenshot(page, "mlflow-experiment-runs.png", capsys)

        # The two invocations' parents compared: the params they differ in, beside the metrics.
        parents = [r for r in client.search_runs([exp.experiment_id], "tags.`maepipe.level` = 'pipeline'")]
        assert sorted(r.info.run_name for r in parents)[-1] == "pinned" and len(parents) == 2
        ids = ",".join(f'"{r.info.run_id}"' for r in parents)
        page.goto(f'{url}/#/compare-runs?runs=[{ids}]&experiments=["{exp.experiment_id}"]')
        page.get_by_text("finetune.min_steps").first.wait_for(timeout=90_000)
        body = page.inner_text("body")
        assert "No parameters to display" not in body and "pinned" in body, body[-3000:]
        assert "patch" in body and "ft-scratch" in body, body[-3000:]
        _screenshot(page, "mlflow-compare-parents.png", capsys)

        # The registered model, with its champion alias.
        page.goto(f"{url}/#/models/maepipe-digits")
        page.get_by_text("champion").first.wait_for(timeout=90_000)
        assert "Version 1" in page.inner_text("body")
        _screenshot(page, "mlflow-registered-model.png", capsys)

        # One pretrain run's metric charts: the val_mse chart must have drawn its line, one vertex per epoch.
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/model-metrics")
        page.wait_for_function(
            f"name => {{ const c = ({METRIC_CHART_JS})(name); "
            f"return c && c.lines.length > 0 && c.lines[0].vertices > 0; }}",
            arg="val_mse",
            timeout=90_000,
        )
        chart = page.evaluate(METRIC_CHART_JS, "val_mse")
        assert chart["width"] > 150 and chart["height"] > 150, chart
        assert "pretrain-p4-m0.5" in chart["text"], chart["text"]
        line = chart["lines"][0]
        assert line["width"] > 50 and line["height"] > 5, chart  # the loss moved between epochs
        assert 2 <= line["vertices"] <= len(steps), (chart, steps)  # plotly may merge collinear points
        assert page.evaluate(METRIC_CHART_JS, "train_loss") is not None
        # The app scrolls inside its own panel, so a full-page shot is the viewport: make it tall enough
        # for all the run's charts, and bring val_mse into view in any case.
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 1500})
        page.wait_for_timeout(500)
        page.evaluate(METRIC_CHART_JS, "val_mse")
        _screenshot(page, "mlflow-run-metrics.png", capsys)
        uncaught = [e for e in page.errors if e.startswith("pageerror")]
        assert not uncaught, uncaught
        page.context.close()


# Keeps the promise of every vegaEmbed() call, so the test can ask each view what it drew.
RECORD_VEGA_VIEWS_JS = """
window.__views = {};
Object.defineProperty(globalThis, 'vegaEmbed', {
  configurable: true,
  get() { return this.__vegaEmbed; },
  set(embed) {
    const wrapped = (el, spec, opts) => (window.__views[el] = embed(el, spec, opts));
    this.__vegaEmbed = Object.assign(wrapped, embed);
  },
});"""

# What one plot drew: the element vega rendered into (canvas or svg), its size, how much of it is
# painted, and every line series (DVC draws each twice: faint raw data and the smoothed line) with its
# number of points, its revision and its file (and column, where one plot shows several).
VEGA_DRAWN_JS = """async (id) => {
  const div = document.getElementById(id);
  const drawn = div && div.querySelector('canvas, svg.marks');
  if (!drawn) return null;
  const box = drawn.getBoundingClientRect();
  const {view} = await window.__views['#' + id];
  const series = [];
  const walk = (mark) => {
    for (const item of mark.items || []) {
      if (mark.marktype === 'group') (item.items || []).forEach(walk);
    }
    if (mark.marktype === 'line' && mark.items && mark.items.length) {
      const d = mark.items[0].datum || {};
      series.push({points: mark.items.length, rev: d.rev, source: d.filename || d['filename::field'] || ''});
    }
  };
  walk(view.scenegraph().root);
  let painted = 0;  // pixels that are neither transparent nor the white background
  if (drawn.tagName === 'CANVAS' && drawn.width > 0 && drawn.height > 0) {
    const px = drawn.getContext('2d').getImageData(0, 0, drawn.width, drawn.height).data;
    for (let i = 0; i < px.length; i += 4)
      if (px[i + 3] > 0 && Math.min(px[i], px[i + 1], px[i + 2]) < 230) painted += 1;
  } else if (drawn.tagName !== 'CANVAS') {
    painted = drawn.querySelectorAll('path').length;
  }
  return {tag: drawn.tagName, width: box.width, height: box.height, painted, series};
}"""


def _vega_specs(html: str) -> dict[str, dict]:
    """div id -> the Vega-Lite spec DVC embedded for it."""
    found = re.findall(
        r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (.*?);\s*'
        r"vegaEmbed\('#\1', spec\);",
        html,
        flags=re.S,
    )
    return {div: json.loads(spec) for div, spec in found}


def _title(spec: dict) -> str:
    title = spec.get("title", "")
    return title.get("text", "") if isinstance(title, dict) else title


def test_plots_diff_page_renders_offline(browser, plots_template, pinned, tmp_path, capsys):
    repo = pinned
    out_dir = tmp_path / "plots_html"
    sh(["dvc", "plots", "diff", "HEAD", "pinned", "-o", str(out_dir), "--html-template", str(plots_template)], repo)
    index = out_dir / "index.html"
    html = index.read_text()
    assert "cdn.jsdelivr.net" not in html and "<script src=" not in html  # nothing to fetch
    specs = _vega_specs(html)
    titles = {_title(spec): div for div, spec in specs.items()}
    both = ("HEAD", "pinned")
    wanted = {  # title -> the (revision, source) series it must draw
        "ROC (micro-average, first repetition), MAE probe / fine-tune vs the random-weight controls and raw pixels": {
            (rev, f"roc_{m}.csv")
            for rev in both
            for m in ("probe", "finetune", "scratch", "probe_random", "pixels_logreg")
        },
        "Probe and fine-tune loss per step (mean over repetitions)": {
            (rev, f"{m}/curve.csv::{col}")
            for rev in both
            for m in ("probe", "finetune")
            for col in ("train_loss", "val_loss")
        },
        "plots/evaluate/roc_finetune.csv": {(rev, "") for rev in both},
        "plots/finetune/curve.csv": {(rev, "") for rev in both},
    }
    assert set(wanted) <= set(titles), sorted(titles)

    page = _page(browser, offline=True)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.context.add_init_script(RECORD_VEGA_VIEWS_JS)
    page.goto(index.as_uri())
    # Every vegaEmbed() call of the page has been made and has finished (a failed one throws here).
    page.wait_for_function("n => Object.keys(window.__views).length === n", arg=len(specs), timeout=60_000)
    page.evaluate("Promise.all(Object.values(window.__views)).then(() => true)")
    assert len(specs) >= 20 and set(page.evaluate("Object.keys(window.__views)")) == {f"#{d}" for d in specs}

    for title, series in wanted.items():
        drawn = page.evaluate(VEGA_DRAWN_JS, titles[title])
        assert drawn and drawn["width"] > 200 and drawn["height"] > 200, (title, drawn)
        assert drawn["painted"] > 3_000, (title, drawn)  # axes, labels and lines, not a blank canvas
        assert {(s["rev"], s["source"]) for s in drawn["series"]} == series, (title, drawn)
        assert all(s["points"] >= 2 for s in drawn["series"]), (title, drawn)
    # The images (reconstructions, ROC figure, ...) are files beside the page and load too.
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
    assert images and all(width > 0 for _, width in images), images
    assert all(u.startswith(("file://", "data:", "blob:")) for u in requests), requests
    assert not page.errors, page.errors
    _screenshot(page, "dvc-plots-diff.png", capsys)
    page.context.close()


def test_every_plot_of_the_diff_loads(browser, plots_template, pinned):
    # browser and plots_template only so that this shares the browser tests' repo and skips where they do.
    out = sh(["dvc", "plots", "diff", "HEAD", "pinned", "--json"], pinned)
    errors = json.loads(out.stdout).get("errors") or []
    assert not errors, errors
