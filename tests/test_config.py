"""Configuration: TOML plus environment overrides, clear errors, masked secrets."""

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from meshwatch.config import ConfigError, TLSConfig, load_config, mask_url, masked_dump

EXAMPLE = Path(__file__).parent.parent / "examples" / "meshwatch.toml"


def test_example_file_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert config.mesh_broker.url.startswith("mqtts://")
    assert config.mesh_broker.tls is not None
    text = EXAMPLE.read_text()
    sections = [type(model) for _, model in config if isinstance(model, BaseModel)]
    sections += [TLSConfig]
    for section in sections:
        for key in section.model_fields:
            assert f"{key} =" in text or f".{key}]" in text, f"{section.__name__}.{key}"


def test_environment_overrides_the_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[mesh]\npartitions = 4\n[influxdb]\nurl = "http://a:8086"\n')
    monkeypatch.setenv("MESHWATCH_MESH__PARTITIONS", "12")
    monkeypatch.setenv("MESHWATCH_INFLUXDB__TOKEN", "t0ken")
    config = load_config(path)
    assert config.mesh.partitions == 12
    assert config.influxdb.url == "http://a:8086"
    assert config.influxdb.token is not None
    assert config.influxdb.token.get_secret_value() == "t0ken"


def test_secrets_are_masked_everywhere(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[site_broker]\nurl = "mqtt://gw:pw-in-url@h:1883"\npassword = "pw-field"\n'
        '[influxdb]\nurl = "http://h:8086"\ntoken = "tok"\n'
        '[database]\nurl = "postgresql+psycopg://u:dbpw@db/mw"\n'
    )
    dumped = str(masked_dump(load_config(path)))
    for secret in ("pw-in-url", "pw-field", "tok'", "dbpw"):
        assert secret not in dumped
    assert "mqtt://gw:***@h:1883" in dumped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mesh]\npartitions = 0\n", "mesh.partitions"),
        ("[mesh]\nparitions = 3\n", "mesh.paritions: unknown key"),
        ('[site_broker]\nurl = "http://x"\n', "mqtt://, mqtts:// or embedded://"),
        ('[site_broker]\nurl = "mqtt://"\n', "has no host"),
        ('[database]\nurl = "mysql://x"\n', "sqlite:///PATH or postgresql"),
        ("[mesh\n", "not valid TOML"),
    ],
)
def test_invalid_files_say_what_is_wrong(tmp_path, text, message) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(path)


def test_missing_file_points_to_the_example(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"examples/meshwatch\.toml"):
        load_config(tmp_path / "nope.toml")


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("mqtt://h:1883") == "mqtt://h:1883"
    assert mask_url("postgresql://u:p@db:5432/x") == "postgresql://u:***@db:5432/x"


toml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
sections = st.dictionaries(
    st.sampled_from(["url", "partitions", "token", "batch_size", "keepalive_s", "file", "x"]),
    toml_scalars.filter(lambda v: v is not None), max_size=4,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["mesh", "influxdb", "site_broker", "database", "other"]),
                       sections, max_size=3))
def test_any_toml_document_loads_or_raises_config_error(tmp_path, document) -> None:
    path = tmp_path / "c.toml"
    lines = []
    for section, values in document.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    try:
        load_config(path)
    except ConfigError as exc:
        assert "problem" in str(exc) or "not valid TOML" in str(exc)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_load_or_raise_config_error(tmp_path, data) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(path)


@pytest.mark.parametrize(("toml", "message"), [
    ('[bridge]\nopcua_site = "dma-01"\n', "set both opcua_site and opcua_gateway_id"),
    ('[bridge]\nclient_id = "bridge/1"\n', "MQTT topic level"),
    ('[bridge]\nmesh_batch_readings = 20000\n', "less than or equal to 10000"),
    ('[[bridge.site_brokers]]\nurl = "http://x"\n', "mqtt://, mqtts:// or embedded://"),
])
def test_bridge_section_errors_say_what_to_fix(tmp_path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bridge_site_brokers_are_a_list_of_broker_tables(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[bridge.site_brokers]]\nurl = "mqtt://a:1883"\n'
                    '[[bridge.site_brokers]]\nurl = "mqtt://b:1883"\nprotocol = "3.1.1"\n')
    config = load_config(path)
    assert [(b.url, b.protocol) for b in config.bridge.site_brokers] == [
        ("mqtt://a:1883", "5"), ("mqtt://b:1883", "3.1.1")]
    monkeypatch.setenv("MESHWATCH_BRIDGE__SITE_BROKERS", '[{"url": "mqtt://c:1883"}]')
    assert [b.url for b in load_config(path).bridge.site_brokers] == ["mqtt://c:1883"]
