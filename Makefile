# spine-ml: the commands a newcomer types. `make demo` runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SPINE := $(VENV)/bin/spine-ml
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo ui bench clean-demo

install: $(STAMP)

# torch/torchvision first and pinned: on the dev machines that pair lies on local disk (a pip cap
# forbids newer); elsewhere pip downloads it. Then the package with its test extra.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m spine_ml.demo sweeps/demo.yaml

ui: $(STAMP)
	$(SPINE) ui sweeps/demo.yaml

bench: $(STAMP)
	$(PY) bench/run_all.py

clean-demo:
	rm -rf data/synthetic data/cache mlruns/mlflow.db mlruns/artifacts mlruns/ray mlruns/optuna submission.csv
