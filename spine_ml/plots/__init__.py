"""Plots logged as MLflow artifacts (matplotlib, headless: `Figure` objects, never pyplot).

- trial.py: per trial, a confusion matrix per condition and a reliability (calibration) plot of
  the out-of-fold predictions (`plots/confusion.png`, `plots/reliability.png`).
- sweep.py: per sweep, the optimisation history and Optuna's parameter importances, logged to the
  sweep's parent run (`plots/optimisation_history.png`, `plots/param_importances.png`).

matplotlib is imported inside the functions, so importing this package costs nothing.
"""
