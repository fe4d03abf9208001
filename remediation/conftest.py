"""Doctest collection for ``remediation``: Alembic's scripts run only inside Alembic."""

collect_ignore_glob = ["migrations/*"]
