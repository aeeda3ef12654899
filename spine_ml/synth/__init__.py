"""The synthetic stand-in for the competition data: real DICOM files in the Kaggle layout, labels
drawn from a known latent model (so the oracle is known), the real data's irregularities.

Modules: calibration (targets from the real train.csv), labels (latents -> labels, oracle),
anatomy (one patient's spine), render (MR-like pixels), series (slice geometry), study (one study
to files), writer (the CSVs), scoring (oracle / prior), generate (the command), preview (PNG).
"""
