"""DICOM -> crop cache (cache.py, plan.py, build.py, crops.py), study-level folds (folds.py) and the
torch Dataset with augmentation (dataset.py, augment.py). Import the submodules; nothing heavy here."""
