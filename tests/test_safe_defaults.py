"""Safe defaults: servers on 127.0.0.1 unless told, weights-only checkpoint loading, safe YAML, and ids
from CSVs checked before they become paths. Each is checked twice where it can be: over the source
(every call site, so a new one cannot slip in) and for real (a hostile file refused, nothing run)."""
from __future__ import annotations

import ast
import functools
import shutil
from pathlib import Path

import pytest

from spine_ml.cli import build_parser, main
from spine_ml.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "spine_ml"
SOURCES = sorted(PACKAGE.rglob("*.py"))


@functools.lru_cache(maxsize=1)
def parsed() -> list[tuple[Path, list[ast.AST]]]:
    return [(path, list(ast.walk(ast.parse(path.read_text(), str(path))))) for path in SOURCES]


def calls(name: str, attribute: str):
    """(file, ast.Call) for every `name.attribute(...)` in the package."""
    for path, nodes in parsed():
        for node in nodes:
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == name):
                yield path, node


def keyword(call: ast.Call, name: str):
    for item in call.keywords:
        if item.arg == name:
            return item.value.value if isinstance(item.value, ast.Constant) else item.value
    return None


# --- servers bind to 127.0.0.1 ---------------------------------------------------------------------------

def test_ui_serves_on_localhost_unless_told(tmp_path):
    from spine_ml.config import Config
    from spine_ml.tracking.ui import ui_command

    config = Config(project_root=tmp_path)
    args = build_parser().parse_args(["ui"])
    command = ui_command(config, args.host, args.port)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    told = build_parser().parse_args(["ui", "--host", "0.0.0.0"])
    command = ui_command(config, told.host, told.port)
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_no_server_in_the_package_binds_to_every_interface():
    for path in SOURCES:
        assert "0.0.0.0" not in path.read_text(), f"{path} names 0.0.0.0"
    for path, call in calls("ray", "init"):  # a local Ray starts no dashboard (it would listen on a port)
        if keyword(call, "address") is None:
            assert keyword(call, "include_dashboard") is False, f"{path}:{call.lineno} ray.init starts the dashboard"


# --- checkpoints load weights only -----------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    found = list(calls("torch", "load"))
    assert found, "no torch.load found: the scan is broken"
    for path, call in found:
        assert keyword(call, "weights_only") is True, f"{path}:{call.lineno}: torch.load without weights_only=True"
    for path, call in calls("np", "load"):
        assert keyword(call, "allow_pickle") in (None, False), f"{path}:{call.lineno}: np.load(allow_pickle=True)"
    for module in ("pickle", "dill", "cloudpickle", "joblib"):
        for name in ("load", "loads", "Unpickler"):
            found = [f"{path}:{call.lineno}" for path, call in calls(module, name)]
            assert not found, f"{module}.{name} in {found}"


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def hostile_checkpoint(tmp_path):
    import torch

    from spine_ml.config import Config
    from spine_ml.models.classifier import build_classifier

    config = Config(project_root=tmp_path).with_updates({"model.backbone": "resnet10t", "prepare.slices": 3})
    marker = tmp_path / "code-ran"
    state = dict(build_classifier(config.model, 3).state_dict())
    state["extra"] = Payload(marker)
    path = tmp_path / "fold0.pt"
    torch.save(state, path)
    assert not marker.exists()
    return config, path, marker


def test_fold_checkpoint_with_a_pickled_object_is_refused(hostile_checkpoint):
    from spine_ml.models.classifier import load_fold_models

    config, path, marker = hostile_checkpoint
    with pytest.raises(UserError, match=str(path)):
        load_fold_models([path], config)
    assert not marker.exists(), "loading the checkpoint ran code"


def test_backbone_checkpoint_with_a_pickled_object_is_refused(hostile_checkpoint):
    from spine_ml.models.classifier import build_classifier

    config, path, marker = hostile_checkpoint
    config = config.with_updates({"model.checkpoint": str(path)})
    with pytest.raises(UserError):
        build_classifier(config.model, 3)
    assert not marker.exists(), "loading model.checkpoint ran code"


def test_localizer_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    import torch
    import yaml

    from spine_ml.config import LocalizerConfig
    from spine_ml.localize.train import CHECKPOINT, SETTINGS, load_localizer

    marker = tmp_path / "code-ran"
    folder = tmp_path / "localizer"
    folder.mkdir()
    torch.save({"weight": torch.zeros(1), "extra": Payload(marker)}, folder / CHECKPOINT)
    (folder / SETTINGS).write_text(yaml.safe_dump({"localizer": LocalizerConfig().model_dump(mode="json"),
                                                   "percentiles": [1.0, 99.5]}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the point is the marker below
        load_localizer(folder)
    assert not marker.exists(), "loading the localizer ran code"


# --- YAML loads safely ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["!!python/object/apply:pathlib.Path.touch", "!!python/object/new:pathlib.Path",
                                 "!!python/name:os.system"])
def test_python_tags_in_a_config_are_a_config_error_and_run_nothing(tmp_path, capsys, tag):
    marker = tmp_path / "code-ran"
    (tmp_path / "sweeps").mkdir()
    config = tmp_path / "sweeps" / "evil.yaml"
    config.write_text(f"train:\n  epochs: {tag} [{str(marker)!r}]\n")
    code = main(["prepare", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and str(config) in err and "not valid YAML" in err
    assert not marker.exists()


def test_every_yaml_load_is_safe():
    for name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"):
        found = [f"{path}:{call.lineno}" for path, call in calls("yaml", name)]
        assert not found, f"yaml.{name} in {found}: use yaml.safe_load"


# --- ids from CSVs are checked before they become paths -------------------------------------------------

BAD_IDS = ["../../etc", "..", "1/../2", "/tmp", "1e3", " "]


def replace_first_id(csv: Path, column: str, value: str) -> None:
    import pandas as pd

    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    frame.loc[0, column] = value
    frame.to_csv(csv, index=False)


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("csv, column", [("train.csv", "study_id"), ("train_series_descriptions.csv", "series_id"),
                                         ("train_label_coordinates.csv", "study_id"),
                                         ("train_label_coordinates.csv", "series_id")])
def test_prepare_refuses_path_like_ids(tiny_data, tmp_path, csv, column, bad):
    from spine_ml.prepare.plan import plan

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns("*_images"))  # CSVs only: refused before images
    replace_first_id(root / csv, column, bad)
    with pytest.raises(UserError, match=csv):
        plan(root)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_predict_refuses_path_like_ids(tiny_data, tmp_path, bad):
    from spine_ml.competition.submission import expected_studies
    from spine_ml.predict.crops import study_series

    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(tiny_data / "test_series_descriptions.csv", root)
    replace_first_id(root / "test_series_descriptions.csv", "study_id", bad)
    with pytest.raises(UserError, match="test_series_descriptions.csv"):
        study_series(root)
    with pytest.raises(UserError, match="test_series_descriptions.csv"):
        expected_studies(data_dir=root)


@pytest.mark.parametrize("column", ["study_id", "series_id"])
def test_localizer_refuses_path_like_ids(tiny_data, tmp_path, column):
    from spine_ml.config import LocalizerConfig
    from spine_ml.localize.dataset import build_samples

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns("*_images"))
    replace_first_id(root / "train_label_coordinates.csv", column, "../../etc")
    with pytest.raises(UserError, match="train_label_coordinates.csv"):
        build_samples(root, [1], LocalizerConfig(), (1.0, 99.5))


def test_prepare_cli_names_the_bad_id(tiny_data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns("*_images"))
    replace_first_id(root / "train.csv", "study_id", "../../etc")
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "t.yaml").write_text(f"data: {{root: {root}}}\n")
    assert main(["prepare", str(tmp_path / "sweeps" / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert "'../../etc'" in err and "train.csv" in err and "line(s) [2]" in err
