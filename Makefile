# spine-ml: the commands a newcomer types. `make demo` runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SPINE := $(VENV)/bin/spine-ml
STAMP := $(VENV)/.installed
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

.PHONY: install browser test test-slow demo ui bench clean-demo

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

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow

# Debian's Chromium for tests/test_ui_browser.py (Playwright, from the dev extra, drives it; its own
# browser download is not used). A no-op when installed; without apt-get the browser test skips.
browser: $(STAMP)
	@if [ -x /usr/bin/chromium ]; then echo "chromium: /usr/bin/chromium"; \
	elif command -v apt-get >/dev/null; then $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "no apt-get: put Chromium at /usr/bin/chromium; tests/test_ui_browser.py skips without it"; fi

demo: $(STAMP)
	$(PY) -m spine_ml.demo sweeps/demo.yaml

ui: $(STAMP)
	$(SPINE) ui sweeps/demo.yaml

bench: $(STAMP)
	$(PY) bench/run_all.py

clean-demo:
	rm -rf data/synthetic data/cache mlruns/mlflow.db mlruns/artifacts mlruns/ray mlruns/optuna submission.csv
