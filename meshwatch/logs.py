"""Logging set-up shared by the service commands (``meshwatch edge``, ``meshwatch bridge``).

>>> root = logging.getLogger()
>>> saved = root.level
>>> configure_logging("WARNING")
>>> root.level == logging.WARNING
True
>>> root.setLevel(saved)
"""

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps at ``level`` (the config's ``log_level``)."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(level)
