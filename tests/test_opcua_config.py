"""The ``[[opcua]]`` configuration: node mappings, security, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshwatch.config import (
    ConfigError,
    OpcUaNodeConfig,
    OpcUaServerConfig,
    load_config,
    masked_dump,
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "meshwatch.toml"
NODE = '[[opcua.nodes]]\nnode_id = "ns=2;s=dma-01-pump.flow_lpm"\ndevice_id = "dma-01-pump"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_example_configures_the_pump_station_with_every_key() -> None:
    config = load_config(EXAMPLE)
    [server] = config.opcua
    assert server.url.startswith("opc.tcp://")
    assert {node.metric for node in server.nodes} == {
        "flow_lpm", "inlet_pressure_bar", "outlet_pressure_bar", "pumps_running_count",
        "energy_kwh", "running_h"}
    text = EXAMPLE.read_text()
    for section in (OpcUaServerConfig, OpcUaNodeConfig):
        for key in section.model_fields:
            assert f"{key} =" in text or f".{key}]" in text, f"{section.__name__}.{key}"


def test_a_minimal_server_gets_defaults(tmp_path) -> None:
    config = load_config(write(tmp_path, '[[opcua]]\nurl = "opc.tcp://plc:4840"\n'
                                         + NODE + 'metric = "flow_lpm"\n'))
    [server] = config.opcua
    assert (server.publishing_interval_ms, server.queue_size, server.username) == (1000, 100, None)
    assert (server.nodes[0].scale, server.nodes[0].offset) == (1.0, 0.0)
    assert load_config(None).opcua == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE + 'metric = "flow"\n',
         r"opcua\.0\.nodes\.0\.metric: .*<quantity>_<unit>.*lpm"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE + 'metric = "flow_gpm"\n',
         "unit is one of"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE, r"nodes\.0\.metric: Field required"),
        ('[[opcua]]\n' + NODE + 'metric = "flow_lpm"\n', r"opcua\.0\.url: Field required"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n', r"opcua\.0\.nodes: Field required"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\nnodes = []\n', "at least 1 item"),
        ('[[opcua]]\nurl = "http://plc:4840"\n' + NODE + 'metric = "flow_lpm"\n',
         "opc.tcp://host:4840"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n[[opcua.nodes]]\nnode_id = "flow"\n'
         'device_id = "d"\nmetric = "flow_lpm"\n', "ns=<index>;s=<name>"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n[[opcua.nodes]]\nnode_id = "i=5"\n'
         'device_id = "bad id/with slash"\nmetric = "flow_lpm"\n', r"nodes\.0\.device_id"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\nusername = "u"\n' + NODE
         + 'metric = "flow_lpm"\n', "both username and password"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE + 'metric = "flow_lpm"\n'
         + NODE + 'metric = "flow_m3h"\n', "node_id ns=2;s=dma-01-pump.flow_lpm mapped more"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE + 'metric = "flow_lpm"\n'
         '[[opcua.nodes]]\nnode_id = "i=5"\ndevice_id = "dma-01-pump"\nmetric = "flow_lpm"\n',
         "device_id/metric dma-01-pump/flow_lpm mapped more"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\n' + NODE + 'metric = "flow_lpm"\nscale = nan\n',
         "scale: .*finite"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\npublishing_interval_ms = 0\n' + NODE
         + 'metric = "flow_lpm"\n', "publishing_interval_ms"),
        ('[[opcua]]\nurl = "opc.tcp://plc:4840"\nsecurity = "x"\n' + NODE
         + 'metric = "flow_lpm"\n', "opcua.0.security: unknown key"),
    ],
)
def test_invalid_opcua_sections_say_what_is_wrong(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(write(tmp_path, text))
    assert "MESHWATCH_OPCUA as JSON" in str(caught.value) or "unknown key" in str(caught.value)


def test_passwords_are_masked_and_the_environment_overrides(tmp_path, monkeypatch) -> None:
    path = write(tmp_path, '[[opcua]]\nurl = "opc.tcp://gw:in-url@plc:4840"\nusername = "gw"\n'
                           'password = "in-field"\n' + NODE + 'metric = "flow_lpm"\n')
    dumped = json.dumps(masked_dump(load_config(path)), default=str)
    assert "in-url" not in dumped
    assert "in-field" not in dumped
    assert "opc.tcp://gw:***@plc:4840" in dumped
    monkeypatch.setenv("MESHWATCH_OPCUA", json.dumps([{
        "url": "opc.tcp://other:4841",
        "nodes": [{"node_id": "ns=3;i=1001", "device_id": "pump-7", "metric": "flow_lpm"}]}]))
    [server] = load_config(path).opcua
    assert server.url == "opc.tcp://other:4841"
    assert server.nodes[0].device_id == "pump-7"


node_tables = st.fixed_dictionaries({}, optional={
    "node_id": st.sampled_from(["ns=2;s=a.b", "i=85", "ns=1;g=x", "", "ns=2;s=é"]),
    "device_id": st.text(max_size=8),
    "metric": st.sampled_from(["flow_lpm", "flow", "Flow_LPM", "x_kwh", ""]) | st.text(max_size=6),
    "scale": st.floats() | st.integers() | st.text(max_size=3),
    "offset": st.floats(),
})


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=st.lists(node_tables, max_size=3),
       interval=st.integers(-5, 5_000_000), url=st.sampled_from(["opc.tcp://h:1", "tcp://h"]))
def test_any_opcua_section_loads_or_raises_config_error(tmp_path, nodes, interval, url) -> None:
    document = {"opcua": [{"url": url, "publishing_interval_ms": interval, "nodes": nodes}]}
    lines = []
    for server in document["opcua"]:
        lines += ["[[opcua]]", f"url = {json.dumps(server['url'])}",
                  f"publishing_interval_ms = {interval}"]
        for node in nodes:
            lines.append("[[opcua.nodes]]")
            for key, value in node.items():
                text = json.dumps(value) if not isinstance(value, float) else repr(value)
                lines.append(f"{key} = {text.replace('Infinity', 'inf')}")
    path = write(tmp_path, "\n".join(lines) + "\n")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert "problem" in str(exc) or "not valid TOML" in str(exc)
    else:
        [server] = config.opcua
        assert server.nodes
        assert server.publishing_interval_ms >= 10
