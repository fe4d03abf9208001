"""Bytewax dataflows: ordering, gaps, detection and sinks (issue 6)."""
