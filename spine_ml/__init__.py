"""spine-ml: experiment-tracked AutoML sweeps for the RSNA 2024 lumbar spine challenge."""
__version__ = "0.1.0"
