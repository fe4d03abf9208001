"""Meshwatch: IoT/edge telemetry and anomaly detection over an event mesh.

The core package holds what every part shares: the event contract
(:mod:`meshwatch.contract`), configuration (:mod:`meshwatch.config`) and the
``meshwatch`` command line (:mod:`meshwatch.cli`). It imports no I/O library.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meshwatch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
