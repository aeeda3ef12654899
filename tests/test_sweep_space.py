"""The YAML search space -> Optuna define-by-run: types, conditions, list choices, validation."""
from __future__ import annotations

import optuna
import pytest

from spine_ml.config import ConfigError, load_config
from spine_ml.sweep.space import check_space, define_by_run, max_fold0_epochs, sampled_updates

from conftest import PROJECT

SPACE = """\
search:
  model.backbone: {type: choice, values: [resnet10t, mobilenetv3_small_050]}
  model.drop_rate: {type: uniform, low: 0.0, high: 0.3, when: {model.backbone: resnet10t}}
  loss.class_weights: {type: choice, values: [[1.0, 2.0, 4.0], [1.0, 1.5, 3.0]]}
  train.lr: {type: loguniform, low: 0.0001, high: 0.01}
  train.epochs: {type: int, low: 2, high: 5}
"""


@pytest.fixture()
def config(tmp_path):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s.yaml").write_text(SPACE)
    return load_config(tmp_path / "sweeps" / "s.yaml")


def test_samples_become_valid_configs_with_conditions(config):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    suggest = define_by_run(config)
    seen_backbones, seen_weights = set(), set()
    for _ in range(30):
        trial = study.ask()
        suggest(trial)
        updated = config.with_updates(sampled_updates(config, trial.params))
        seen_backbones.add(updated.model.backbone)
        seen_weights.add(updated.loss.class_weights)
        assert ("model.drop_rate" in trial.params) == (updated.model.backbone == "resnet10t")
        assert 1e-4 <= updated.train.lr <= 1e-2 and 2 <= updated.train.epochs <= 5
        assert isinstance(updated.train.epochs, int)
        study.tell(trial, 1.0)
    assert seen_backbones == {"resnet10t", "mobilenetv3_small_050"}
    assert seen_weights == {(1.0, 2.0, 4.0), (1.0, 1.5, 3.0)}
    assert max_fold0_epochs(config) == 5


def test_tpe_is_seeded(config):
    def draws(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for _ in range(5):
            trial = study.ask()
            define_by_run(config)(trial)
            out.append(dict(trial.params))
            study.tell(trial, trial.params["train.lr"])
        return out
    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_bad_spaces_are_refused(config):
    with pytest.raises(ConfigError, match="search.prepare.patch_mm: cannot be searched"):
        check_space(config.with_updates({"search": {"prepare.patch_mm": {"type": "choice", "values": [32, 48]}}}))
    with pytest.raises(ConfigError, match="must be a searched key listed before"):
        check_space(config.with_updates({"search": {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2,
                                                                 "when": {"model.backbone": "x"}}}}))
    with pytest.raises(ConfigError, match="a value of the space is not a valid config"):
        check_space(config.with_updates({"search": {"train.epochs": {"type": "choice", "values": [0, 3]}}}))


@pytest.mark.parametrize("name", ["base.yaml", "demo.yaml"])
def test_shipped_spaces_are_valid(name):
    check_space(load_config(PROJECT / "sweeps" / name))


def shipped_backbones() -> list[str]:
    names = set()
    for path in (PROJECT / "sweeps").glob("*.yaml"):
        config = load_config(path)
        names.add(config.model.backbone)
        if "model.backbone" in config.search:
            names.update(config.search["model.backbone"].values)
    return sorted(names)


@pytest.mark.parametrize("backbone", shipped_backbones())
def test_every_shipped_backbone_builds_and_grades(backbone):
    """A backbone a sweep can sample must work with our heads (MobileNetV3 once failed here)."""
    import torch

    from spine_ml.config import ModelConfig
    from spine_ml.models.classifier import build_classifier

    model = build_classifier(ModelConfig(backbone=backbone, pretrained=False), slices=3).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 64, 64), torch.tensor([0, 4]))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_searcher_survives_a_result_replayed_after_a_driver_crash(config, tmp_path):
    """Optuna's storage closed a trial that Tune's restored state still thinks is running (the driver
    was killed between the two saves): the replayed result must not stop the sweep."""
    from ray.tune.search.optuna import OptunaSearch

    from spine_ml.sweep.search import ResumableOptunaSearch

    def searcher(cls, name):
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
        made = cls(space=define_by_run(config), metric="objective", mode="min", study_name=name,
                   storage=storage, sampler=optuna.samplers.TPESampler(seed=0))
        made.suggest("t1")
        made._ot_study.tell(made._ot_trials["t1"], 0.5)  # what the killed driver's Optuna had stored
        return made

    plain = searcher(OptunaSearch, "plain")
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        plain.on_trial_result("t1", {"objective": 0.5, "training_iteration": 1})
    resumable = searcher(ResumableOptunaSearch, "resumable")
    resumable.on_trial_result("t1", {"objective": 0.5, "training_iteration": 1})
    resumable.on_trial_complete("t1", {"objective": 0.5})
    trials = resumable._ot_study.get_trials()
    assert len(trials) == 1 and trials[0].value == 0.5 and trials[0].state == optuna.trial.TrialState.COMPLETE
