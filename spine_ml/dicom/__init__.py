"""DICOM series reading (read.py), patient-space geometry (geometry.py) and `spine-ml inspect`.

Nothing is imported here so that `import spine_ml.dicom` stays light; import the submodules.
"""
