"""Typed, strict configs: YAML -> validated, frozen pydantic models.

Unknown keys are errors named by their full path (``model.backbon: unknown key; did you mean
backbone?``); ``--set a.b=c`` overrides go through the same validation; relative paths resolve
against the project root (the folder holding ``sweeps/``), never the current directory.
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from spine_ml.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the file and key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthSpec(Section):
    """How to generate the synthetic stand-in when `data.root` has no data yet."""
    studies: int = Field(60, ge=1, description="train studies")
    test_studies: int = Field(12, ge=0, description="test studies (labels kept apart for scoring)")
    seed: int = Field(0, description="seed of the whole synthetic set (same seed, same files)")
    image_size: int = Field(160, ge=32, le=1024, description="typical Rows/Columns of a slice")


class DataConfig(Section):
    root: Path = Field(Path("data"), description="Kaggle layout: train.csv, train_images/, ...")
    synthetic: SynthSpec | None = Field(None, description="generate a synthetic set here when absent")


class PrepareConfig(Section):
    slices: int = Field(5, ge=1, description="slices per 2.5D sample, centred on the labelled one")
    patch_mm: float = Field(64.0, gt=0, description="side of the cached square patch, in mm")
    pixel_mm: float = Field(0.5, gt=0, description="resampled pixel size of the cache, in mm")
    cache_dir: Path = Field(Path("data/cache"), description="crop caches, one per setting")
    workers: int = Field(0, ge=0, description="processes for the build; 0 = all cores")
    percentiles: tuple[float, float] = Field((1.0, 99.5), description="robust intensity window per series")

    @property
    def patch_px(self) -> int:
        return int(round(self.patch_mm / self.pixel_mm))


class ModelConfig(Section):
    backbone: str = Field("resnet18", description="any timm model name")
    pretrained: bool = Field(False, description="timm pretrained weights (needs hub access)")
    checkpoint: Path | None = Field(None, description="local weights file for the backbone")
    crop_px: int = Field(96, ge=8, description="crop cut from the cached patch (cache pixels)")
    input_px: int | None = Field(None, ge=8, description="resize crops to this before the backbone")
    slice_pooling: Literal["channels", "mean", "attention"] = Field(
        "channels", description="slices as input channels, or each slice alone then mean / attention pooled")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier head")


class LossConfig(Section):
    class_weights: tuple[float, float, float] = Field((1.0, 2.0, 4.0), description="CE weight per severity")
    group_weights: dict[Literal["spinal", "foraminal", "subarticular"], float] = Field(
        default_factory=lambda: {"spinal": 1.0, "foraminal": 1.0, "subarticular": 1.0},
        description="loss weight per condition group")
    any_severe_weight: float = Field(0.0, ge=0, description="auxiliary any_severe_spinal term")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class AugmentConfig(Section):
    shift_px: float = Field(4.0, ge=0, description="max shift of the crop (and its point), cache pixels; "
                            "match the localizer's error (train-localizer suggests a value)")
    rotate_deg: float = Field(10.0, ge=0, description="max in-plane rotation, degrees")
    scale: float = Field(0.1, ge=0, lt=1, description="zoom drawn in 1 +- scale")
    intensity: float = Field(0.1, ge=0, description="contrast in 1 +- intensity, offset in +- intensity")
    flip: bool = Field(True, description="left/right flip, swapping left/right labels")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, description="epochs per fold (the ASHA budget)")
    batch_size: int = Field(32, ge=1, description="crops per optimiser step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    schedule: Literal["cosine", "onecycle", "constant"] = Field("cosine", description="learning-rate schedule")
    grad_clip: float | None = Field(1.0, gt=0, description="gradient norm clip; null = none")
    ema: float | None = Field(None, gt=0, lt=1, description="EMA decay of the weights, e.g. 0.99")
    seed: int = Field(42, description="seed of weights, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    num_workers: int = Field(0, ge=0, description="DataLoader workers")
    max_batches_per_epoch: int | None = Field(None, ge=1, description="cap for quick tests")
    augment: AugmentConfig = Field(AugmentConfig(), description="training-time augmentation")


class CVConfig(Section):
    folds: int = Field(5, ge=2, description="study-level folds (stratified by severity profile)")
    seed: int = Field(42, description="fold assignment seed (folds.csv beside the cache)")


class SearchParam(Section):
    """One dimension of the search space: `type` and its arguments."""
    type: Literal["choice", "uniform", "loguniform", "int"] = Field(description="the distribution")
    values: list[Any] | None = Field(None, description="choice: the values")
    low: float | None = Field(None, description="uniform, loguniform, int: lower bound")
    high: float | None = Field(None, description="uniform, loguniform, int: upper bound")
    step: int | None = Field(None, description="int: step between values")
    when: dict[str, Any] | None = Field(None, description="sample only when these params take these values")

    @model_validator(mode="after")
    def _arguments(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type} needs `low` < `high`")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs `low` > 0")
        return self


class Resources(Section):
    cpu: float = Field(1, gt=0, description="CPUs per trial")
    gpu: float = Field(0, ge=0, description="GPUs per trial; fractions share a GPU, e.g. 0.5")


class SweepConfig(Section):
    name: str = Field("sweep", description="the sweep's name (Ray state, Optuna study, parent run)")
    target: Literal["classifier", "localizer"] = Field(
        "classifier", description="what the trials train: the classifier (run_trial, OOF score) or the level "
        "localizer (train_localizer, held-out mean_error_mm; search: holds only localizer.* keys)")
    num_samples: int = Field(8, ge=1, description="trials to run")
    max_concurrent: int = Field(2, ge=1, description="trials at once")
    max_failures: int = Field(1, ge=0, description="retries of a trial that raises or dies")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: stop trials on fold-0 epochs; none: full budget")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA keeps the top 1/reduction_factor at each rung")
    seed: int = Field(0, description="Optuna TPE seed")
    resources: Resources = Field(Resources(), description="per trial")
    reuse_workers: bool = Field(True, description="run the next trial in the finished trial's Ray worker "
                                "(torch, timm and MLflow stay imported: ~5 s saved per trial on a CPU)")
    widen_tail: bool = Field(True, description="once the last trial has started, CPU trials still running "
                             "take the torch threads of finished trials on their node (see sweep/threads.py); "
                             "false: every trial keeps its thread count, so reruns repeat bit for bit")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under mlruns/")
    experiment: str = Field("spine-ml", description="MLflow experiment of the runs")


class RayConfig(Section):
    address: str | None = Field(None, description="existing cluster; RAY_ADDRESS also works")
    num_cpus: int | None = Field(None, description="local Ray only: CPUs to use (default all)")
    num_gpus: int | None = Field(None, description="local Ray only: GPUs to use (default all)")
    storage_path: Path = Field(Path("mlruns/ray"), description="Ray Tune results (shared on a cluster)")


class EnsembleConfig(Section):
    top_k: int = Field(5, ge=1, description="best finished runs considered as members")
    per_backbone: int | None = Field(None, ge=1, description="at most this many members per backbone")
    budget_hours: float = Field(9.0, gt=0, description="inference budget the chosen blend must fit (Kaggle: 9 h)")
    studies: int = Field(700, ge=1, description="hidden test studies, for the inference budget")


class LocalizerConfig(Section):
    """The level localizer (`spine-ml train-localizer`): a heatmap model over whole slices."""
    backbone: str = Field("resnet10t", description="timm model for the heatmap encoder (features_only)")
    input_px: int = Field(128, ge=32, description="each slice is resized to input_px x input_px")
    context_slices: int = Field(3, ge=1, description="neighbouring slices as input channels (odd)")
    sigma_mm: float = Field(4.0, gt=0, description="in-plane spread of a target heatmap peak, mm")
    depth_sigma_mm: float = Field(2.5, gt=0, description="fall-off of a target peak across slices, mm")
    axial_slices: int = Field(2, ge=0, description="train on the labelled axial slice +- this many")
    epochs: int = Field(12, ge=1, description="training epochs")
    batch_size: int = Field(32, ge=1, description="slices per step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW, one-cycle)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="train studies held out for the metrics")
    max_studies: int | None = Field(None, ge=2, description="cap on train studies (quick tests)")
    axial_max_distance_mm: float = Field(12.0, gt=0, description="a level farther than this from every axial "
                                         "slice is not covered (its subarticular rows get the prior)")
    seed: int = Field(0, description="seed of the held-out split and the weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")


class PredictConfig(Section):
    batch_size: int = Field(64, ge=1, description="crops per forward pass")
    crops_dir: Path = Field(Path("data/cache/test-crops"), description="localised test crops, reused by members")

    @model_validator(mode="before")
    @classmethod
    def _drop_unused_workers(cls, raw: Any) -> Any:
        # predict.workers was accepted but never used; configs saved with it by earlier runs still load
        if isinstance(raw, dict) and "workers" in raw:
            raw = {k: v for k, v in raw.items() if k != "workers"}
        return raw


class Config(Section):
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    cv: CVConfig = CVConfig()
    search: dict[str, SearchParam] = Field(default_factory=dict, description="config path -> distribution")
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    localizer: LocalizerConfig = LocalizerConfig()
    predict: PredictConfig = PredictConfig()
    project_root: Path = Field(Path("."), description="set by the loader, not in YAML", exclude=True)

    @field_validator("search")
    @classmethod
    def _search_paths(cls, search: dict[str, SearchParam]) -> dict[str, SearchParam]:
        for key in search:
            _check_path(key)
        return search

    def path(self, value: Path | str) -> Path:
        """A config path made absolute against the project root."""
        value = Path(value).expanduser()
        return value if value.is_absolute() else (self.project_root / value).resolve()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"project_root"})

    def with_updates(self, updates: dict[str, Any]) -> Config:
        """A new, validated config with dotted-path updates applied (how trials apply samples)."""
        raw = self.to_dict()
        for key, value in updates.items():
            _set_path(raw, key, value)
        return validate(raw, self.project_root, source="updates")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value for every leaf (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and prefix != "search":
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif prefix != "search":
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _check_path(key: str) -> None:
    """A dotted path must name a leaf of Config (used for search keys and --set)."""
    node: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(node, "model_fields", None)
        if fields is None:
            if isinstance(node, type) or node is None:
                raise ValueError(f"{'.'.join(parts[:i])} has no sub-key {part!r}")
            return  # dicts (group_weights) accept their own keys
        if part not in fields or part == "project_root":
            raise ValueError(_unknown(".".join(parts[: i + 1]), part, [f for f in fields if f != "project_root"]))
        annotation = fields[part].annotation
        node = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else (
            dict if "dict" in str(annotation) else None)


def _unknown(path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return f"{path}: unknown key{hint}"


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    node: Any = Config
    for part in loc[:-1]:
        fields = getattr(node, "model_fields", {})
        annotation = fields[part].annotation if part in fields else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            node = annotation
        else:
            return []
    return [f for f in getattr(node, "model_fields", {}) if f != "project_root"]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            lines.append(_unknown(path, str(loc[-1]), _known_fields(loc)))
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {message} (got {item.get('input')!r})" if path else message)
    return f"{source}: invalid config\n  " + "\n  ".join(lines)


def validate(raw: dict[str, Any], project_root: Path, source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    if "project_root" in raw:
        raise ConfigError(f"{source}: project_root: unknown key; it is set from the config file's location")
    try:
        return Config.model_validate({**raw, "project_root": Path(project_root)})
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def find_project_root(config_path: Path) -> Path:
    """SPINE_ML_ROOT, else the parent of a `sweeps/` folder holding the file, else a folder
    above it with pyproject.toml, else the file's own folder."""
    if os.environ.get("SPINE_ML_ROOT"):
        return Path(os.environ["SPINE_ML_ROOT"]).resolve()
    config_path = config_path.resolve()
    if config_path.parent.name == "sweeps":
        return config_path.parent.parent
    for folder in config_path.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return config_path.parent


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set model.backbone=resnet18")
    key = key.strip()
    try:
        _check_path(key)
    except ValueError as error:
        raise ConfigError(f"--set {text!r}: {error}") from None
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate, freeze."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (the sweeps/ folder holds base.yaml and demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(raw, key, value)
    return validate(raw, find_project_root(path), source=str(path))


def save_config(config: Config, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return path
