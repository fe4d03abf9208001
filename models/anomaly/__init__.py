"""Anomaly detectors that follow river's contract (:mod:`.base`) and their calibration."""
