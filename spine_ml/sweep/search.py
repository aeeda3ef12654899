"""The sweep's searcher: Ray Tune's OptunaSearch, made safe to resume after the driver died.

Tune saves its searcher with the experiment state now and then, while Optuna writes every result to
its storage at once. When the driver is killed between the two (kill -9, a lost node), the restored
searcher still thinks a trial is running that Optuna's storage has already closed; the resumed trial
then replays its result (spine_ml.sweep.trainable reports the run it logged), and OptunaSearch's
`report` on a finished Optuna trial raises UpdateFinishedTrialError out of the sweep. Here that trial
is simply marked complete: Optuna already holds its value.
"""
from __future__ import annotations

import logging

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.info("trial %s: Optuna already recorded its result before the restart", trial_id)
            self._completed_trials.add(trial_id)
