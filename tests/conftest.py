"""Shared fixtures: a tiny synthetic data set made once per test session, and a tiny project
(a temp folder with sweeps/ and a config pointing at that data), so tests never touch the real
data/ or mlruns/."""
from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("SPINE_ML_QUIET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
REAL_LABELS = SHARED / "data" / "rsna2024"

TINY_STUDIES = 12  # every irregularity appears at least once from 12 studies on
TINY_TEST_STUDIES = 4


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A Kaggle-layout synthetic data set: 12 train + 4 test studies, small images (read-only!)."""
    from spine_ml.synth.generate import generate_dataset

    out = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(out, studies=TINY_STUDIES, test_studies=TINY_TEST_STUDIES, seed=7, image_size=64, workers=1)
    return out


TINY_CONFIG = """\
data:
  root: {data}
prepare:
  slices: 3
  patch_mm: 32.0
  pixel_mm: 1.0
  workers: 1
model:
  backbone: resnet10t
  crop_px: 24
  input_px: 24
train:
  epochs: 1
  batch_size: 32
  num_workers: 0
cv:
  folds: 2
  seed: 0
search:
  model.crop_px: {{type: choice, values: [16, 24]}}
  train.lr: {{type: loguniform, low: 0.0005, high: 0.005}}
sweep:
  num_samples: 2
  max_concurrent: 1
  grace_period: 1
tracking:
  experiment: tests
"""


@pytest.fixture()
def tiny_project(tmp_path, tiny_data) -> Path:
    """A throw-away project root: sweeps/tiny.yaml over tiny_data, its own data/cache and mlruns/."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "tiny.yaml").write_text(TINY_CONFIG.format(data=tiny_data))
    return tmp_path


@pytest.fixture()
def tiny_config(tiny_project):
    from spine_ml.config import load_config

    return load_config(tiny_project / "sweeps" / "tiny.yaml")


@pytest.fixture()
def copy_of(tmp_path):
    """Copy a read-only fixture folder before a test modifies it."""
    def make(source: Path) -> Path:
        target = tmp_path / f"copy_{source.name}"
        shutil.copytree(source, target)
        return target
    return make
