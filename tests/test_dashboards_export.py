"""``meshwatch dashboards export DIR``: dashboard JSON plus Grafana provisioning YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dashboards.boards import all_dashboards
from dashboards.provisioning import to_yaml
from meshwatch.cli import main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_export_writes_dashboards_and_provisioning(tmp_path: Path) -> None:
    out = tmp_path / "grafana"
    assert main(["dashboards", "export", str(out), "--influx-url", "http://influx:8086",
                 "--database", "water"]) == 0
    files = _files(out)
    boards = all_dashboards()
    assert set(files) == {f"dashboards/{b['uid']}.json" for b in boards} | {
        "provisioning/datasources/meshwatch.yaml", "provisioning/dashboards/meshwatch.yaml"}
    for board in boards:
        assert json.loads(files[f"dashboards/{board['uid']}.json"]) == board

    sources = yaml.safe_load(files["provisioning/datasources/meshwatch.yaml"])
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["uid"] == boards[0]["panels"][0]["datasource"]["uid"]
    assert (source["type"], source["url"], source["access"]) == (
        "influxdb", "http://influx:8086", "proxy")
    assert source["jsonData"] == {"dbName": "water", "httpMode": "POST", "version": "InfluxQL",
                                  "httpHeaderName1": "Authorization"}
    assert source["secureJsonData"] == {
        "httpHeaderValue1": "Token ${MESHWATCH_INFLUXDB__TOKEN}"}

    providers = yaml.safe_load(files["provisioning/dashboards/meshwatch.yaml"])
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["folderUid"] == "meshwatch"
    assert provider["options"]["path"] == str((out / "dashboards").resolve())
    assert provider["disableDeletion"] is False
    assert provider["allowUiUpdates"] is False


def test_export_is_deterministic_and_takes_a_grafana_path(tmp_path: Path) -> None:
    args = ["dashboards", "export", "--dashboards-path", "/var/lib/grafana/dashboards",
            "--token-env", ""]
    assert main([*args[:2], str(tmp_path / "a"), *args[2:]]) == 0
    assert main([*args[:2], str(tmp_path / "b"), *args[2:]]) == 0
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first == second
    providers = yaml.safe_load(first["provisioning/dashboards/meshwatch.yaml"])
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    (source,) = yaml.safe_load(first["provisioning/datasources/meshwatch.yaml"])["datasources"]
    assert "secureJsonData" not in source
    assert "httpHeaderName1" not in source["jsonData"]


def test_yaml_round_trips_awkward_values() -> None:
    value: dict[str, Any] = {"a": ["yes", "no", "on", "1", "", "x: y", "#c", "it's", "ü"],
                             "b": {"c": [], "d": {}, "e": [{"f": None, "g": True}], "h": 1.5}}
    assert yaml.safe_load(to_yaml(value)) == value
