"""Training: run_trial(config) -> TrialResult over CV folds; losses, loops, the `spine-ml train` verb.

Pure: no Ray, Optuna or MLflow in here; the sweep and the CLI wrap it."""
