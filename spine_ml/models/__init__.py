"""Models: the severity classifier (timm backbone + per-condition-group heads)."""
