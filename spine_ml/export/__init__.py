"""The Kaggle hand-off: `spine-ml export` writes an offline bundle of an ensemble (wheel, manifest,
checkpoints, entry script, notebook); `spine-ml predict --bundle` runs it with no MLflow store.

    bundle.py    export: MLflow runs -> bundle folder
    artifacts.py the wheel, the entry script, the notebook, the bundle README
    load.py      bundle folder -> members, blend and localizer, checked file by file
    run.py       bundle -> submission.csv, timed, with the runtime projection
"""
