"""``meshwatch flow``: the command's checks before it starts bytewax."""

from __future__ import annotations

import pytest

from dataflows.command import flow_settings
from meshwatch.cli import main
from meshwatch.config import load_config


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_an_embedded_broker_is_refused_with_a_clear_message(tmp_path, capsys) -> None:
    assert main(["flow", "--config", str(write(tmp_path, ""))]) == 2
    assert "mesh_broker.url" in capsys.readouterr().err


def test_a_cluster_needs_both_process_id_and_addresses(tmp_path, capsys) -> None:
    config = write(tmp_path, '[mesh_broker]\nurl = "mqtt://127.0.0.1:1"\n')
    assert main(["flow", "--config", str(config), "-i", "0"]) == 2
    assert "-a/--addresses" in capsys.readouterr().err


def test_settings_come_from_the_config(tmp_path) -> None:
    registry = tmp_path / "registry.csv"
    registry.write_text("device_id,device_kind,site,district,gateway_id,cadence_s\n"
                        "m1,customer_meter,s1,d1,gw-1,900\n")
    config = write(tmp_path, f"""
[mesh_broker]
url = "mqtt://flow:pw@broker.example:1884"
[mesh]
partitions = 3
[influxdb]
url = "http://tsdb:8086"
token = "tok"
[registry]
file = "{registry}"
[flow]
allowed_lateness_s = 2.5
shards_per_partition = 7
""")
    settings = flow_settings(load_config(config))
    assert settings.source.partitions == 3
    assert (settings.source.broker.host, settings.source.broker.port) == ("broker.example", 1884)
    assert settings.source.broker.password == "pw"
    assert settings.order.allowed_lateness_ms == 2500
    assert settings.shards_per_partition == 7
    assert settings.cadences == {"m1": 900.0}
    assert settings.influx is not None
    assert settings.influx.token == "tok"
    assert settings.lake_dir is None


def test_no_influx_url_means_no_tsdb_sink(tmp_path) -> None:
    config = write(tmp_path, '[mesh_broker]\nurl = "mqtt://127.0.0.1:1883"\n')
    assert flow_settings(load_config(config)).influx is None


@pytest.mark.parametrize("value", ["0", "-1"])
def test_flow_settings_are_validated(tmp_path, value) -> None:
    config = write(tmp_path, f'[mesh_broker]\nurl = "mqtt://h:1"\n[flow]\nworkers = {value}\n')
    assert main(["flow", "--config", str(config)]) == 2
