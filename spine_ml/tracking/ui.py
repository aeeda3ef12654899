"""`spine-ml ui`: the MLflow UI over the project's tracking store, bound to 127.0.0.1 by default."""
from __future__ import annotations

import os
import signal
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


def runs_page(config, base_url: str) -> str | None:
    """The experiment's runs table in the UI's model-training view (MLflow 3 opens experiments in its
    GenAI view unless the URL says otherwise), or None when the experiment does not exist yet."""
    from spine_ml.tracking.store import client

    experiment = client(config).get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    return f"{base_url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"


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
    base_url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI: {base_url}  (store {uri}; Ctrl-C stops it)")
    page = runs_page(config, base_url)
    if page:
        print(f"runs of experiment '{config.tracking.experiment}': {page}")
    sys.stdout.flush()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return serve(ui_command(config, args.host, args.port), env)


def serve(command: list[str], env: dict[str, str]) -> int:
    """Run the MLflow server until it exits; `kill` (SIGTERM) of this process stops it too."""
    server = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server as well: let it finish shutting down
        server.wait()
        return 0
