"""Driver-side Tune callbacks: MLflow runs for trials that could not log themselves, and a concise
live table in place of Ray's wall of logs."""
from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from spine_ml.config import Config


class MlflowTrialRecords(Callback):
    """Pruned and failed trials get an MLflow run here (finished ones log themselves in the worker)."""

    def __init__(self, base: dict[str, Any], project_root: str, experiment_id: str, parent_run_id: str):
        self.base, self.project_root = base, project_root
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.states: dict[str, str] = {}

    def _config(self, trial) -> Config:
        from spine_ml.config import validate
        from spine_ml.sweep.space import sampled_updates

        base = validate(self.base, self.project_root, source="sweep config")
        return base.with_updates(sampled_updates(base, trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "final" not in result:
            self.history.setdefault(trial.trial_id, []).append(
                {k: result[k] for k in ("val_score", "val_loss", "train_loss", "epoch", "timestamp") if k in result})

    def on_trial_complete(self, iteration, trials, trial, **info):
        from spine_ml.sweep.records import log_stopped_trial

        last = trial.last_result or {}
        if "mlflow_run_id" in last:
            self.states[trial.trial_id] = "finished"
            return
        self.states[trial.trial_id] = "pruned"
        log_stopped_trial(self._config(trial), self.experiment_id, self.parent_run_id, trial.trial_id, "pruned",
                          self.history.get(trial.trial_id, []))

    def on_trial_error(self, iteration, trials, trial, **info):
        from spine_ml.sweep.records import log_stopped_trial

        self.states[trial.trial_id] = "failed"
        message = _error_text(trial)
        log_stopped_trial(self._config(trial), self.experiment_id, self.parent_run_id, trial.trial_id, "failed",
                          self.history.get(trial.trial_id, []), error=message)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path:
            with open(path) as handle:
                return handle.read()
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "unknown error")


def error_summary(text: str) -> str:
    """The last meaningful line of a traceback (the exception and its message)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and not line.startswith("File "):
            return line[:200]
    return lines[-1][:200] if lines else "unknown error"


class LiveTable(Callback):
    """One line per event: trial, key params, fold-0 epoch and score, final score, state."""

    def __init__(self, search_keys: list[str], quiet: bool = False, score_label: str = "score"):
        # no stream kept: Ray pickles callbacks into the sweep state, and sys.stdout is looked up per line
        self.search_keys = search_keys
        self.score_label = score_label
        self.quiet = quiet
        self.start = time.time()
        self.printed_header = False

    def _line(self, trial, state: str, epoch: str = "", fold0: str = "", score: str = "") -> None:
        if self.quiet:
            return
        if not self.printed_header:
            label = getattr(self, "score_label", "score")  # absent in the state of a sweep started before it
            print(f"{'time':>6}  {'trial':<14} {'state':<9} {'epoch':>5} {'fold0':>7} {label:>7}  params", file=sys.stdout)
            self.printed_header = True
        params = " ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in trial.config.items() if k in self.search_keys)
        elapsed = f"{time.time() - self.start:5.0f}s"
        print(f"{elapsed:>6}  {trial.trial_id:<14} {state:<9} {epoch:>5} {fold0:>7} {score:>7}  {params}",
              file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "final" in result:
            return
        self._line(trial, "fold0", f"{result.get('epoch')}/{result.get('epochs')}", f"{result['val_score']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "final" in last:
            self._line(trial, "finished", score=f"{last['objective']:.4f}")  # the score, or a localizer's mm
        else:
            fold0 = f"{last['val_score']:.4f}" if "val_score" in last else ""
            self._line(trial, "pruned", f"{last.get('epoch', '')}/{last.get('epochs', '')}", fold0)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")
        if not self.quiet:
            print(f"        {trial.trial_id}: {error_summary(_error_text(trial))}", file=sys.stdout, flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._line(trial, "retrying")
