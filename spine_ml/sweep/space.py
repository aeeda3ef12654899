"""The search space is data (`search:` in the sweep YAML); this turns it into an Optuna
define-by-run function for Ray's OptunaSearch, and samples back into config updates.

Optuna's categorical values must be scalars, so a choice among lists (e.g. class weights) is offered
to Optuna by its JSON text and decoded when the config is built.
"""
from __future__ import annotations

import json
from typing import Any

from spine_ml.config import Config, ConfigError, SearchParam

UNSEARCHABLE_PREFIXES = ("prepare.", "data.", "cv.", "sweep.", "tracking.", "ray.", "ensemble.")
# these choose the held-out studies (or where a trial runs): trials scored on different studies don't compare
LOCALIZER_FIXED = ("localizer.holdout_fraction", "localizer.max_studies", "localizer.seed", "localizer.device")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def encode_choices(values: list[Any]) -> list[Any]:
    return [v if _is_scalar(v) else json.dumps(v) for v in values]


def decode_value(param: SearchParam, value: Any) -> Any:
    if param.type == "choice" and isinstance(value, str) and not all(_is_scalar(v) for v in param.values or []):
        return json.loads(value)
    return value


def check_space(config: Config) -> None:
    """Reject keys that would break the shared cache or the CV protocol, and conditions on unknown keys."""
    if config.sweep.target == "localizer" and config.localizer.holdout_fraction == 0:
        raise ConfigError("localizer.holdout_fraction: 0 leaves no held-out studies to score localizer trials on; "
                          "set it to e.g. 0.2 for a localizer sweep")
    seen: list[str] = []
    for key, param in config.search.items():
        check_target(config, key)
        if key.startswith(UNSEARCHABLE_PREFIXES):
            raise ConfigError(
                f"search.{key}: cannot be searched — the crop cache, folds and tracking are shared by every "
                f"trial of a sweep; run one sweep per setting instead")
        for other in (param.when or {}):
            if other not in seen:
                raise ConfigError(f"search.{key}.when: {other!r} must be a searched key listed before {key!r}")
        seen.append(key)
    try:  # every value of the space must produce a valid config
        for key, param in config.search.items():
            for value in (param.values if param.type == "choice" else [param.low, param.high]):
                config.with_updates({key: int(value) if param.type == "int" else value})
    except ConfigError as error:
        raise ConfigError(f"search: a value of the space is not a valid config\n{error}") from None


def check_target(config: Config, key: str) -> None:
    """A localizer sweep searches only `localizer.*`; a classifier sweep never does (run_trial ignores it)."""
    if config.sweep.target == "localizer":
        if not key.startswith("localizer."):
            raise ConfigError(
                f"search.{key}: sweep.target is localizer, so search: may hold only localizer.* keys (the trials "
                f"run train_localizer, which ignores {key}); remove it, or sweep the classifier in another config")
        if key in LOCALIZER_FIXED:
            raise ConfigError(f"search.{key}: cannot be searched — it sets which studies are held out (or the "
                              f"device), so trials would be scored on different studies; set it once under localizer:")
    elif key.startswith("localizer."):
        raise ConfigError(f"search.{key}: the classifier's trials never train the localizer; to sweep it, set "
                          f"sweep.target: localizer (`spine-ml sweep sweeps/localizer.yaml`)")


class DefineByRun:
    """An Optuna define-by-run function over `config.search`, honouring `when:` conditions.

    A class, not a closure: Ray pickles the searcher (and this with it) into the sweep's state.
    """

    def __init__(self, search: dict[str, SearchParam]):
        self.space = dict(search)

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for key, param in self.space.items():
            if param.when and any(decode_value(self.space[k], chosen.get(k)) != v for k, v in param.when.items()):
                continue
            if param.type == "choice":
                chosen[key] = trial.suggest_categorical(key, encode_choices(param.values))
            elif param.type == "int":
                chosen[key] = trial.suggest_int(key, int(param.low), int(param.high), step=param.step or 1)
            else:
                chosen[key] = trial.suggest_float(key, param.low, param.high, log=param.type == "loguniform")


def define_by_run(config: Config) -> DefineByRun:
    return DefineByRun(config.search)


def sampled_updates(config: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """Ray's trial config (Optuna's flat params) -> dotted config updates with decoded values."""
    updates = {}
    for key, value in sampled.items():
        if key in config.search:
            updates[key] = decode_value(config.search[key], value)
    return updates


def max_fold0_epochs(config: Config) -> int:
    """The largest epoch budget a trial can get (ASHA's max_t is one report more)."""
    param = config.search.get("train.epochs")
    if param is None:
        return config.train.epochs
    return int(max(param.values) if param.type == "choice" else param.high)
