# Two commands do everything on a fresh clone: `make run` (the pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# DVC stage commands say `python`: it must be the environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_DEB := /usr/share/datasets/fashion-mnist

.PHONY: run test bench setup data-source mlflow-ui

run: setup
	dvc repro

test: setup
	pytest -q

# A benchmark, not a test: maepipe's loop against the usual DataLoader loop (pipeline/bench.py).
bench: setup
	dvc repro data
	python -m pipeline.bench

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

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000
