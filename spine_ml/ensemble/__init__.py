"""`spine-ml ensemble`: pick finished runs from MLflow, fit blend weights and calibration on their OOF
predictions under the competition metric (scored by nested study-level CV), respect an inference
budget, and write the blended test submission."""
