"""Read an exported bundle back into what prediction needs: members (config, fold checkpoints,
weight), the blend's temperatures and the localizer folder. No MLflow, no config file, no network.

Every file the manifest lists is checked (present, size, sha256) before anything runs, so a
truncated upload fails at once naming the file, not an hour into a Kaggle run. Checkpoints stored in
half precision (`spine-ml export --half`) are turned back into float32 copies under `scratch`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spine_ml.competition import vocabulary as V
from spine_ml.errors import UserError

if TYPE_CHECKING:
    from spine_ml.config import Config
    from spine_ml.ensemble.weights import Blend

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
BUNDLE_KIND = "spine-ml bundle"
BUNDLE_FORMAT = 1
HALF, FULL = "float16", "float32"


class BundleError(UserError):
    """A bundle folder that cannot be used; the message names the file and says what to do."""


@dataclass(frozen=True)
class BundleMember:
    run_id: str
    weight: float
    config: Config  # the run's resolved config, as the ensemble predicted with it, pointed at this machine
    checkpoints: list[Path]  # float32 fold checkpoints


@dataclass(frozen=True)
class Bundle:
    folder: Path
    manifest: dict[str, Any]
    members: list[BundleMember]
    temperatures: np.ndarray  # one per V.CONDITIONS
    localizer_folder: Path  # holding localizer.pt (float32) + localizer.yaml
    localizer_config: Config  # whose localizer.device / batch_size load the localizer

    @property
    def blend(self) -> Blend:
        from spine_ml.ensemble.weights import Blend

        return Blend(weights=np.array([m.weight for m in self.members]), temperatures=self.temperatures)

    @property
    def hidden_studies(self) -> int:
        return int(self.manifest["ensemble"].get("studies", 700))

    @property
    def budget_hours(self) -> float:
        return float(self.manifest["ensemble"].get("budget_hours", 9.0))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, path: Path) -> dict[str, Any]:
    """How the manifest lists a file: its path inside the bundle, size and sha256."""
    return {"path": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def checked_file(folder: Path, entry: dict[str, Any]) -> Path:
    """The bundle file of a manifest entry, after checking it is there, whole and unchanged."""
    path = folder / entry["path"]
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle (manifest.json lists it); upload the whole bundle "
                          f"folder again, or export it again with `spine-ml export`")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise BundleError(f"{path}: {size} bytes but manifest.json says {entry['bytes']} (a truncated upload?); "
                          f"upload the bundle folder again")
    if sha256_of(path) != entry["sha256"]:
        raise BundleError(f"{path}: contents differ from what manifest.json recorded (sha256); the file was "
                          f"changed or damaged after export; upload the bundle folder again")
    return path


def read_manifest(folder: Path | str) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder; give the folder `spine-ml export --out` wrote")
    if not path.is_file():
        raise BundleError(f"{path}: not found; {folder} is not a bundle (`spine-ml export CONFIG --out DIR` "
                          f"writes manifest.json, predict.py and the checkpoints)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{path}: not a spine-ml bundle manifest (no \"kind\": \"{BUNDLE_KIND}\")")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this spine-ml reads format "
                          f"{BUNDLE_FORMAT}; run the bundle with the wheel it ships (its predict.py installs it)")
    return manifest


def float32_copy(source: Path, target: Path) -> Path:
    """A half-precision state dict saved back as float32 (integer buffers untouched)."""
    import torch

    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same problem to the user
        raise BundleError(f"{source}: not a readable weights file ({type(error).__name__}: {error})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, target)
    return target


def usable_checkpoint(folder: Path, entry: dict[str, Any], scratch: Path) -> Path:
    path = checked_file(folder, entry)
    return float32_copy(path, scratch / entry["path"]) if entry.get("dtype") == HALF else path


def runnable_device(device: str) -> str:
    """`cuda` becomes `auto`: a bundle must also run where there is no GPU (and uses one where there is)."""
    return "auto" if device == "cuda" else device


def localizer_files(folder: Path, localizer: dict[str, Any], scratch: Path) -> Path:
    """The folder to load the localizer from: the bundle itself, or a float32 copy in `scratch`."""
    import shutil

    half = any(file.get("dtype") == HALF for file in localizer["files"])
    target = scratch / "localizer" if half else folder
    for file in localizer["files"]:
        path = checked_file(folder, file)
        if half and file.get("dtype") == HALF:
            float32_copy(path, target / path.name)
        elif half:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / path.name)
    return target


def member_config(raw: dict[str, Any], folder: Path, scratch: Path, source: str) -> Config:
    """A member's stored config, pointed at this machine: the bundle's train.csv for the prior
    fallback, test crops in `scratch`, no tracking store."""
    from spine_ml.config import ConfigError, validate

    try:
        config = validate(raw, scratch, source=source)
        return config.with_updates({
            "data.root": str(folder), "data.synthetic": None, "predict.crops_dir": str(scratch / "test-crops"),
            "tracking.uri": None, "train.device": runnable_device(config.train.device),
            "localizer.device": runnable_device(config.localizer.device)})
    except ConfigError as error:
        raise BundleError(f"{error}\n(the bundle was made by another spine-ml version? run it with the wheel "
                          f"it ships: its predict.py installs it)") from None


def load_bundle(folder: Path | str, scratch: Path) -> Bundle:
    """The bundle in `folder`, every listed file checked; float32 copies of half checkpoints go to `scratch`."""
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    where = folder / MANIFEST
    try:
        members = []
        for index, entry in enumerate(manifest["members"]):
            config = member_config(entry["config"], folder, scratch, f"{where} members[{index}] config")
            checkpoints = [usable_checkpoint(folder, c, scratch) for c in entry["checkpoints"]]
            if not checkpoints:
                raise BundleError(f"{where}: member {entry['run_id']} lists no fold checkpoints; export again")
            members.append(BundleMember(entry["run_id"], float(entry["weight"]), config, checkpoints))
        temperatures = np.array([float(manifest["blend"]["temperatures"][c]) for c in V.CONDITIONS])
        localizer = manifest["localizer"]
        localizer_folder = localizer_files(folder, localizer, scratch)
        # manifest["prior"] (train.csv) is not checked: it is only the fallback behind the data's own
        # train.csv, and Kaggle may re-encode tabular files of a dataset.
    except KeyError as error:
        raise BundleError(f"{where}: missing key {error}; the manifest is damaged or hand-edited, export again") from None
    if not members:
        raise BundleError(f"{where}: no members; export the bundle again")
    weights = sum(m.weight for m in members)
    if not np.isclose(weights, 1.0, atol=1e-6) or min(m.weight for m in members) < 0:
        raise BundleError(f"{where}: member weights sum to {weights:.6f} (must be >= 0 and sum to 1); export again")
    localizer_config = members[0].config.with_updates({
        "localizer.batch_size": int(localizer.get("batch_size", 32)),
        "localizer.device": runnable_device(localizer.get("device", "auto"))})
    return Bundle(folder, manifest, members, temperatures, localizer_folder, localizer_config)
