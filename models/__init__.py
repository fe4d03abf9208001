"""Detectors following river's contract, edge model training and evaluation (issue 5)."""
