"""Sweeps: Ray Tune + Optuna + ASHA over run_trial, one MLflow run per trial."""
