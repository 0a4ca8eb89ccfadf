# Two commands do everything on a fresh clone: `make run` (the pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# DVC stage commands say `python`: it must be the environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_DEB := /usr/share/datasets/fashion-mnist

.PHONY: run test lint serve bench setup data-source mlflow-ui mlflow-server team-deps browser-deps compiler plots-html

run: setup
	dvc repro

# The team tests (PostgreSQL tracking server, headless Chromium) need system packages: installed
# here when we are root with apt-get; elsewhere those tests skip and say how to install them.
# Two pytest-xdist workers, each pinned to its own cores (tests/conftest.py), work-stealing the
# long end-to-end tests; the session's tiny pipeline is built once and shared.
test: setup team-deps browser-deps compiler
	pytest -q -n 2 --dist worksteal

# Lint and format check (ruff.toml); `.ci/run` runs it before the tests. `ruff format .` fixes format.
lint: setup
	ruff check .
	ruff format --check .

# A benchmark, not a test: maepipe's loop against the usual DataLoader loop (tools/bench.py).
bench: setup
	dvc repro data
	python -m tools.bench

setup: $(STAMP) data-source

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $(STAMP)

# Fashion-MNIST from Debian's package where we can install it; elsewhere the data stage falls
# back to a local copy in data/raw/fashion_mnist/ or torchvision's download.
data-source:
	@if [ ! -d $(FASHION_DEB) ] && [ ! -d data/raw/fashion_mnist ] && command -v apt-get >/dev/null \
	   && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "note: could not install dataset-fashion-mnist; the data stage will try torchvision's download"; \
	fi

# The registry's champion over HTTP on 127.0.0.1 (README "Serving the champion"); no environment
# download: it runs in this venv. POST images to http://127.0.0.1:$(SERVE_PORT)/invocations.
SERVE_PORT ?= 5002
serve: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} mlflow models serve \
	  -m "models:/maepipe-$$(python -c 'from pipeline import params; print(params.load().downstream_dataset)')@champion" \
	  --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# A shared tracking server: PostgreSQL + `mlflow server --serve-artifacts` on 127.0.0.1:5001,
# everything under .mlflow-server/. Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5001
mlflow-server: setup team-deps
	python -m tools.tracking_server

APT_INSTALL = if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null) \
	    || echo "note: could not install $(1); the tests that need it will skip"; fi

# torch.compile on the CPU builds its kernels with a C++ compiler (the compile test needs one).
compiler:
	@command -v $${CXX:-g++} >/dev/null || { $(call APT_INSTALL,g++); }

team-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(call APT_INSTALL,postgresql); }

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser),
# and Vega / Vega-Lite / Vega-Embed from npm for offline `dvc plots` HTML (web/plots-template.html).
browser-deps: web/plots-template.html
	@command -v chromium >/dev/null || { $(call APT_INSTALL,chromium); }

web/plots-template.html: web/package.json web/package-lock.json web/plots-template.in.html web/build-template.js
	@command -v npm >/dev/null || { $(call APT_INSTALL,npm); }
	@if command -v npm >/dev/null; then npm ci --prefix web --silent --no-audit --no-fund || echo "note: npm ci failed; the plots browser test will skip"; fi

# `dvc plots diff` as one self-contained offline page: make plots-html REVS="HEAD my-exp"
plots-html: setup browser-deps
	dvc plots diff $(REVS) --html-template web/plots-template.html -o dvc_plots
