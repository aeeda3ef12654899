"""`spine-ml ui`: the MLflow UI over the project's tracking store, bound to 127.0.0.1 by default."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spine_ml.errors import UserError


def store_arguments(config) -> tuple[str, str]:
    """(backend store URI, default artifact root) of the project's SQLite store."""
    from spine_ml.tracking.store import tracking_uri

    uri = tracking_uri(config)
    artifacts = (config.project_root / "mlruns" / "artifacts").resolve()
    return uri, artifacts.as_uri()


def ui_command(config, host: str, port: int) -> list[str]:
    uri, artifacts = store_arguments(config)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", artifacts, "--host", host, "--port", str(port), "--workers", "1"]


def _default_config():
    """Without a CONFIG: the project in the current folder (its sweeps/demo.yaml or defaults)."""
    from spine_ml.config import Config, load_config

    for candidate in (Path("sweeps/demo.yaml"), Path("sweeps/base.yaml")):
        if candidate.is_file():
            return load_config(candidate)
    return Config(project_root=Path.cwd())


def cli(args) -> int:
    from spine_ml.config import load_config

    config = load_config(args.config) if args.config else _default_config()
    uri, _ = store_arguments(config)
    if not uri.startswith("sqlite:"):
        print(f"tracking store is a server: open {uri} in a browser (nothing to start here)")
        return 0
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.exists():
        raise UserError(f"no MLflow store yet at {database}; run `spine-ml train` or `spine-ml sweep` first "
                        f"(or `make demo`)")
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"warning: serving the MLflow UI on {args.host}: anyone who can reach this machine can read "
              f"and change your runs", file=sys.stderr)
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {uri}; Ctrl-C stops it)", flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    try:
        return subprocess.call(ui_command(config, args.host, args.port), env=env)
    except KeyboardInterrupt:
        return 0
