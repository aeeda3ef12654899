"""MLflow tracking: store/URI resolution and logging of trial results."""
