"""What several bench scripts share: a throw-away project around a sweep config, and how figures
are printed and saved. Imported as `common` (a script's own folder is on sys.path)."""
from __future__ import annotations

import json
from pathlib import Path


def project_copy(config: Path, root: Path) -> Path:
    """The config in a throw-away project under `root` (its own cache, mlruns, Ray state); the data
    root made absolute, so the data set stays the project's (made once)."""
    from spine_ml.config import load_config

    source = load_config(config)
    (root / "sweeps").mkdir(parents=True, exist_ok=True)
    copy = root / "sweeps" / config.name
    copy.write_text(config.read_text().replace(f"root: {source.data.root}", f"root: {source.path(source.data.root)}"))
    return copy


def report(figures: dict, json_path: str | None) -> None:
    """One `name value` line per figure; also a JSON file when asked (--json)."""
    for key, value in figures.items():
        print(f"{key:24} {value}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
