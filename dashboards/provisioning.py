"""Grafana file provisioning: the dashboards as JSON files plus the two YAML files Grafana reads.

:func:`export` writes into ``DIR``::

    DIR/dashboards/mw-fleet.json ...              one file per dashboard (named by uid)
    DIR/provisioning/datasources/meshwatch.yaml   the InfluxDB (InfluxQL) data source
    DIR/provisioning/dashboards/meshwatch.yaml    a file provider for DIR/dashboards

Point Grafana's ``paths.provisioning`` at ``DIR/provisioning`` (or copy the two files into
its own provisioning folders) and make ``DIR/dashboards`` readable at ``dashboards_path``.
The data source sends ``Authorization: Token $TOKEN_ENV`` (Grafana expands environment
variables in provisioning files), which InfluxDB 2.x/3.x need for their v1 API; InfluxDB 1.x
without authentication ignores it.

>>> print(to_yaml({"apiVersion": 1, "list": [{"name": "a b", "n": None}], "e": {}}))
apiVersion: 1
list:
  - name: "a b"
    n: null
e: {}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboards.model import DATASOURCE

__all__ = ["DatasourceSettings", "dashboard_provider", "datasource", "export", "to_yaml"]

FOLDER_UID = "meshwatch"
FOLDER_TITLE = "Meshwatch"


@dataclass(frozen=True, slots=True)
class DatasourceSettings:
    """Where Grafana finds InfluxDB; ``database`` is the 1.x database or the 2.x/3.x bucket."""

    url: str = "http://localhost:8086"
    database: str = "meshwatch"
    token_env: str | None = "MESHWATCH_INFLUXDB__TOKEN"


def datasource(settings: DatasourceSettings) -> dict[str, Any]:
    """The data source as Grafana's API and provisioning both take it.

    >>> datasource(DatasourceSettings(token_env=None))["jsonData"]
    {'dbName': 'meshwatch', 'httpMode': 'POST', 'version': 'InfluxQL'}
    """
    out: dict[str, Any] = {
        "name": "Meshwatch InfluxDB", "uid": DATASOURCE["uid"], "type": DATASOURCE["type"],
        "access": "proxy", "url": settings.url, "isDefault": False,
        "jsonData": {"dbName": settings.database, "httpMode": "POST", "version": "InfluxQL"},
    }
    if settings.token_env:
        out["jsonData"]["httpHeaderName1"] = "Authorization"
        out["secureJsonData"] = {"httpHeaderValue1": f"Token ${{{settings.token_env}}}"}
    return out


def dashboard_provider(dashboards_path: str) -> dict[str, Any]:
    """A file provider that loads every JSON file under ``dashboards_path`` into the folder."""
    return {"apiVersion": 1, "providers": [{
        "name": "meshwatch", "orgId": 1, "folder": FOLDER_TITLE, "folderUid": FOLDER_UID,
        "type": "file", "disableDeletion": False, "allowUiUpdates": False,
        "updateIntervalSeconds": 60,
        "options": {"path": dashboards_path, "foldersFromFilesStructure": False}}]}


def export(out_dir: Path, boards: Sequence[dict[str, Any]], settings: DatasourceSettings,
           dashboards_path: str | None = None) -> list[Path]:
    """Write the dashboards and provisioning files; returns the paths written.

    ``dashboards_path`` is where Grafana will see ``out_dir/dashboards`` (default: that
    directory's absolute path, right when Grafana runs on this machine).
    """
    board_dir = out_dir / "dashboards"
    written = []
    for board in boards:
        written.append(_write(board_dir / f"{board['uid']}.json",
                              json.dumps(board, indent=2, sort_keys=True) + "\n"))
    source = {"apiVersion": 1, "datasources": [datasource(settings)]}
    written.append(_write(out_dir / "provisioning" / "datasources" / "meshwatch.yaml",
                          to_yaml(source) + "\n"))
    provider = dashboard_provider(dashboards_path or str(board_dir.resolve()))
    written.append(_write(out_dir / "provisioning" / "dashboards" / "meshwatch.yaml",
                          to_yaml(provider) + "\n"))
    return written


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file
    return path


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars (strings double-quoted as in JSON)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {to_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        lines = []
        for item in value:
            text = to_yaml(item, indent + 2)
            lines.append(f"{pad}- {text.lstrip()}" if isinstance(item, (dict, list))
                         else f"{pad}- {text}")
        return "\n".join(lines)
    if isinstance(value, str):
        return value if value.isidentifier() and value not in _YAML_WORDS else json.dumps(value)
    return json.dumps(value)


_YAML_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n",
                         "True", "False", "Null", "Yes", "No", "On", "Off", "NULL", "TRUE",
                         "FALSE", "YES", "NO", "ON", "OFF", "Y", "N", "~"})
