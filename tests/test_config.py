"""Strict configs: every file in sweeps/ loads; unknown keys and bad values are named by path;
--set overrides go through the same validation; paths resolve against the project root."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from spine_ml.cli import VERBS, main
from spine_ml.config import ConfigError, load_config, save_config

from conftest import PROJECT


@pytest.mark.parametrize("path", sorted((PROJECT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert config.project_root == PROJECT
    for key, param in config.search.items():  # every searched value is valid where it lands
        for value in (param.values if param.type == "choice" else [param.low, param.high]):
            config.with_updates({key: int(value) if param.type == "int" else value})
    copy = tmp_path / "sweeps" / path.name
    save_config(config, copy)
    assert load_config(copy).to_dict() == config.to_dict()


def test_overrides_are_validated_and_typed():
    config = load_config(PROJECT / "sweeps/demo.yaml", ["train.epochs=3", "model.backbone=resnet18", "train.ema=0.99",
                                                          "loss.class_weights=[1, 3, 9]"])
    assert (config.train.epochs, config.model.backbone, config.train.ema) == (3, "resnet18", 0.99)
    assert config.loss.class_weights == (1.0, 3.0, 9.0)
    with pytest.raises(ConfigError, match=r"model.backbon: unknown key; did you mean backbone\?"):
        load_config(PROJECT / "sweeps/demo.yaml", ["model.backbon=resnet18"])
    with pytest.raises(ConfigError, match="train.epochs: .*greater than or equal to 1"):
        load_config(PROJECT / "sweeps/demo.yaml", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(PROJECT / "sweeps/demo.yaml", ["train.epochs"])


def test_file_errors_name_file_and_full_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: resnet18\ntrain:\n  augment: {flipp: true}\nsweep: {scheduler: hyperband}\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    text = str(error.value)
    assert str(bad) in text
    assert "model.backbon: unknown key; did you mean backbone?" in text
    assert "train.augment.flipp: unknown key; did you mean flip?" in text
    assert "sweep.scheduler: Input should be 'asha' or 'none'" in text
    bad.write_text("search:\n  model.backbon: {type: choice, values: [a]}\n")
    with pytest.raises(ConfigError, match="model.backbon: unknown key; did you mean backbone"):
        load_config(bad)
    bad.write_text("search:\n  train.lr: {type: loguniform, low: 0, high: 1}\n")
    with pytest.raises(ConfigError, match="search.train.lr: loguniform needs `low` > 0"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_paths_resolve_against_project_root_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "proj" / "sweeps").mkdir(parents=True)
    (tmp_path / "proj" / "sweeps" / "x.yaml").write_text("data: {root: data/here}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("proj/sweeps/x.yaml")
    assert config.path(config.data.root) == (tmp_path / "proj" / "data" / "here").resolve()
    assert config.path("/abs/path") == Path("/abs/path")


def test_configs_are_frozen_and_updates_revalidate():
    config = load_config(PROJECT / "sweeps/demo.yaml")
    with pytest.raises(Exception):
        config.train.epochs = 2
    assert config.with_updates({"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(ConfigError, match="train.lr"):
        config.with_updates({"train.lr": -1})
    assert "project_root" not in config.flat() and config.flat()["model.backbone"] == "resnet10t"


def test_help_is_instant_and_every_verb_has_an_example():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "spine_ml", "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - start < 1.5  # interpreter start included; the CLI itself stays ~50 ms
    for verb in VERBS:
        assert verb.name in result.stdout
    loaded = subprocess.run([sys.executable, "-c", "import sys, spine_ml.cli; spine_ml.cli.build_parser();"
                             "print(sorted(m for m in ('torch','ray','mlflow','timm','pydicom','pandas') if m in sys.modules))"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize("verb", [v.name for v in VERBS])
def test_verb_help_shows_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main([verb, "--help"])
    assert exit_code.value.code == 0
    assert "example: spine-ml " + verb in capsys.readouterr().out


def test_readme_config_reference_lists_every_key_and_is_in_sync():
    from spine_ml.config import Config
    from spine_ml.config_doc import render, rows, section_of

    keys = {key for key, _, _, _ in rows()}
    for key, _, _, meaning in rows():
        assert meaning, f"config key {key} has no description: give its Field a description"
    # every key the loader accepts is documented, sections and leaves alike
    dumped = Config().to_dict()
    flat = set()

    def walk(node, prefix=""):
        for name, value in node.items():
            flat.add(prefix + name)
            if isinstance(value, dict) and name not in ("search", "group_weights"):
                walk(value, prefix + name + ".")
    walk(dumped)
    flat.discard("data.synthetic")  # None by default: its keys come from SynthSpec
    missing = {k for k in flat if k not in keys and not any(k == s.split(".")[0] for s in keys)}
    assert not missing, f"keys not in the reference: {sorted(missing)}"
    assert "train.augment.shift_px" in keys and "search.<config path>.type" in keys
    readme = (PROJECT / "README.md").read_text()
    assert section_of(readme) == render(), (
        "README.md's config reference is stale: run `python -m spine_ml.config_doc --write README.md`")


def test_config_doc_write_refuses_a_file_without_markers(tmp_path, capsys):
    from spine_ml.config_doc import main as doc_main

    target = tmp_path / "OTHER.md"
    target.write_text("# no markers here\n")
    assert doc_main(["--write", str(target)]) == 1
    assert target.read_text() == "# no markers here\n"
    assert "config-reference" in capsys.readouterr().err
