"""Synthetic DeepLab-v2 fixtures: the net definitions (netspec) and deterministic caffemodels (weights)."""
