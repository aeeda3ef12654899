"""What a bundle carries besides weights: the spine_ml wheel built from this checkout, the entry
script predict.py, the notebook submission.ipynb and a README.

The wheel is installed with `pip install --no-index --no-deps`: the Kaggle image already has torch,
timm, pydicom, numpy, pandas, scipy, pydantic, pyyaml and tqdm, and the scoring notebook has no
internet to fetch anything else. The bundle's prediction path imports none of MLflow, Ray or Optuna.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from spine_ml.errors import UserError

# What the Kaggle image must already hold (the wheel brings none of it).
RUNTIME_REQUIREMENTS = ("torch", "timm", "pydicom", "numpy", "pandas", "scipy", "pydantic", "yaml", "tqdm")
REQUIREMENTS_NOTE = ("The spine_ml wheel is installed with `pip install --no-index --no-deps`: torch, timm, pydicom, "
                     "numpy, pandas, scipy, pydantic (v2), pyyaml and tqdm must already be installed (the Kaggle "
                     "Python image ships them; predict.py names any that are missing; compressed DICOMs also need "
                     "pylibjpeg). MLflow, Ray and Optuna are not needed.")


class WheelError(UserError):
    """The spine_ml wheel cannot be built from this installation."""


def source_checkout() -> Path:
    """The checkout this spine_ml is imported from (an editable install), where its pyproject.toml is."""
    import spine_ml

    root = Path(spine_ml.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise WheelError(f"spine_ml is imported from {root}, which has no pyproject.toml: export builds the wheel "
                         f"from a source checkout; run it from one (`pip install -e .` in the repository)")
    return root


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a clean copy of the package sources (so the build
    writes nothing into the checkout) into `dest`; returns the wheel."""
    root = source_checkout()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spine-ml-wheel-") as scratch:
        source = Path(scratch) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (root / name).is_file():
                shutil.copy2(root / name, source / name)
        shutil.copytree(root / "spine_ml", source / "spine_ml",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                   "--quiet", "--wheel-dir", str(dest), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("spine_ml-*.whl"))
    if done.returncode != 0 or not wheels:
        raise WheelError(f"building the spine_ml wheel failed (`{' '.join(command[:8])} ...`, exit "
                         f"{done.returncode}): {done.stderr.strip()[-800:]}; pip and setuptools must be installed "
                         f"in this environment")
    return wheels[-1]


def source_revision() -> dict:
    """The git commit of the checkout and whether the package sources differ from it (best effort)."""
    root = source_checkout()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", "spine_ml", "pyproject.toml")
    return {"git_commit": commit, "git_dirty": bool(changes) if changes is not None else None}


def versions() -> dict:
    import importlib

    import spine_ml

    found = {"python": platform.python_version(), "spine_ml": spine_ml.__version__}
    for name in ("torch", "timm", "pydicom", "numpy", "pandas"):
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    return found


ENTRY_SCRIPT = '''\
#!/usr/bin/env python3
"""Run this spine-ml bundle: install its wheel offline, predict every test study, write a submission.

On Kaggle (internet off):  python /kaggle/input/<this dataset>/predict.py
Elsewhere:                 python predict.py --data DATA_DIR --out submission.csv

{requirements}
"""
import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KAGGLE_DATA = "{kaggle_data}"
KAGGLE_OUT = "{kaggle_out}"
REQUIREMENTS = {requirements_list!r}


def fail(message):
    print(f"predict.py: error: {{message}}", file=sys.stderr)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(description="predict with this spine-ml bundle")
    parser.add_argument("--data", default=KAGGLE_DATA, help="Kaggle-layout test data (default: %(default)s)")
    parser.add_argument("--out", default=KAGGLE_OUT, help="submission to write (default: %(default)s)")
    parser.add_argument("--no-install", action="store_true",
                        help="skip the pip install; use the spine_ml already importable")
    args = parser.parse_args(argv)
    manifest_path = HERE / "manifest.json"
    if not manifest_path.is_file():
        return fail(f"{{manifest_path}} not found; upload the whole bundle folder that `spine-ml export` wrote")
    manifest = json.loads(manifest_path.read_text())
    if not args.no_install:
        wheel = HERE / manifest["wheel"]["path"]
        if not wheel.is_file():
            return fail(f"{{wheel}} not found; upload the whole bundle folder that `spine-ml export` wrote")
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall",
                   "--quiet", str(wheel)]
        if subprocess.run(command).returncode != 0:
            return fail(f"`{{' '.join(command)}}` failed (see above)")
        importlib.invalidate_caches()
    missing = [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        return fail(f"not installed in this Python: {{', '.join(missing)}} (the wheel is installed without "
                    f"dependencies; use a Kaggle image or environment that has them)")
    import pydantic

    if not str(getattr(pydantic, "VERSION", "2")).startswith("2"):
        return fail(f"spine_ml needs pydantic 2, this Python has {{pydantic.VERSION}}")
    from spine_ml.cli import main as spine_ml

    return spine_ml(["predict", "--bundle", str(HERE), "--data", args.data, "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
'''


def entry_script() -> str:
    from spine_ml.export.run import KAGGLE_DATA, KAGGLE_OUT

    return ENTRY_SCRIPT.format(requirements=REQUIREMENTS_NOTE, kaggle_data=KAGGLE_DATA, kaggle_out=KAGGLE_OUT,
                               requirements_list=list(RUNTIME_REQUIREMENTS))


NOTEBOOK_CODE = '''\
# Finds the attached spine-ml bundle (a dataset holding manifest.json) and runs its predict.py, which
# installs the bundle's wheel offline and writes the submission. Internet: off.
import glob, json, subprocess, sys

DATA = "{kaggle_data}"
OUT = "{kaggle_out}"


def is_bundle(path):
    try:
        with open(path) as stream:
            return json.load(stream).get("kind") == "{kind}"
    except (OSError, ValueError):
        return False


bundles = sorted({{path.rsplit("/", 1)[0] for depth in ("*", "*/*", "*/*/*")
                  for path in glob.glob(f"/kaggle/input/{{depth}}/manifest.json") if is_bundle(path)}})
if len(bundles) != 1:
    raise SystemExit(f"attach exactly one spine-ml bundle dataset to this notebook; found {{bundles or 'none'}}")
subprocess.run([sys.executable, f"{{bundles[0]}}/predict.py", "--data", DATA, "--out", OUT], check=True)
'''


def notebook(manifest: dict) -> dict:
    """submission.ipynb (nbformat 4): one markdown cell, one cell that runs the bundle, one that shows the file."""
    from spine_ml.export.load import BUNDLE_KIND
    from spine_ml.export.run import KAGGLE_DATA, KAGGLE_OUT

    members = ", ".join(f"{m['run_id'][:8]} ({m['backbone']}, weight {m['weight']:.3f})" for m in manifest["members"])
    intro = (f"# spine-ml submission\n\nEnsemble run `{manifest['ensemble']['run_id']}`: {members}.\n\n"
             f"Attach the competition data and the bundle dataset, switch the internet off, then Run All. "
             f"It writes `{KAGGLE_OUT}`.\n\n{REQUIREMENTS_NOTE}\n")
    code = NOTEBOOK_CODE.format(kaggle_data=KAGGLE_DATA, kaggle_out=KAGGLE_OUT, kind=BUNDLE_KIND)
    show = f"import pandas as pd\n\npd.read_csv(\"{KAGGLE_OUT}\").describe()\n"

    def cell(index: int, kind: str, source: str) -> dict:
        common = {"cell_type": kind, "id": f"cell-{index}", "metadata": {}, "source": source.splitlines(keepends=True)}
        return common if kind == "markdown" else {**common, "execution_count": None, "outputs": []}

    return {"nbformat": 4, "nbformat_minor": 5,  # 4.5: every cell has an id
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "cells": [cell(0, "markdown", intro), cell(1, "code", code), cell(2, "code", show)]}


def write_notebook(manifest: dict, path: Path) -> Path:
    path.write_text(json.dumps(notebook(manifest), indent=1) + "\n")
    return path


def bundle_readme(manifest: dict) -> str:
    from spine_ml.export.run import KAGGLE_DATA, KAGGLE_OUT

    sizes = manifest["sizes"]
    lines = [
        "# spine-ml bundle", "",
        f"Ensemble run {manifest['ensemble']['run_id']} of experiment {manifest['ensemble']['experiment']!r}, "
        f"exported {manifest['created']} ({'float16' if manifest['half'] else 'float32'} checkpoints, "
        f"{sizes['checkpoints_mb']:.1f} MB of {sizes['bundle_mb']:.1f} MB).", "",
        "On Kaggle: upload this folder as a dataset, attach it and the competition data to a notebook,",
        "switch the internet off and run submission.ipynb (or `python predict.py`). It writes",
        f"{KAGGLE_OUT} from {KAGGLE_DATA}.", "",
        "Elsewhere: `python predict.py --data DATA_DIR --out submission.csv`, or with spine-ml installed",
        "`spine-ml predict --bundle THIS_FOLDER --data DATA_DIR --out submission.csv`.", "",
        REQUIREMENTS_NOTE, "",
        "Contents: manifest.json (members, weights, temperatures, configs, localizer, versions, sha256 of",
        "every file), predict.py, submission.ipynb, the spine_ml wheel, member-<run id>-<fold>.pt (fold",
        "checkpoints), localizer.pt + localizer.yaml, train.csv (the training prior for rows no crop covers,",
        "used when the data folder has no train.csv). No subfolders: upload the files as they are.", "",
    ]
    return "\n".join(lines)
