"""Smoke tests of the real-server harness: each server does real work, survives restarts."""

from __future__ import annotations

import os
import queue
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from servers import (
    InfluxDB1,
    MissingBinaryError,
    Mosquitto,
    PostgreSQL,
    Server,
    ServerError,
    VictoriaMetrics,
)

WAIT = 5.0  # seconds; everything here happens on loopback
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _process_group_alive(pgid: int) -> bool:
    """Whether any process is still in process group ``pgid`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process went away while we looked
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state, ppid, pgrp, ...
            return True
    return False


class Probe:
    """A paho-mqtt 2.x MQTTv5 client that records what it receives."""

    def __init__(
        self,
        broker: Mosquitto,
        client_id: str = "",
        *,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._granted: list[int] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _client, _userdata, msg: self.messages.put(msg)
        properties = Properties(PacketTypes.CONNECT)
        if session_expiry:
            properties.SessionExpiryInterval = session_expiry
        self.client.connect(
            broker.host, broker.port, clean_start=clean_start, properties=properties
        )
        self.client.loop_start()
        assert self._connected.wait(WAIT), f"no successful CONNACK from {broker.url}"

    def _on_connect(self, _client, _userdata, flags, reason_code, _properties) -> None:  # type: ignore[no-untyped-def]
        if not reason_code.is_failure:
            self.session_present = flags.session_present
            self._connected.set()

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _properties) -> None:  # type: ignore[no-untyped-def]
        self._granted = [code.value for code in reason_codes]
        self._subscribed.set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=qos)
        assert self._subscribed.wait(WAIT), f"no SUBACK for {topic}"
        assert self._granted == [qos], f"broker granted {self._granted} for {topic}"

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def receive(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no message within {WAIT}s")

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- mosquitto -----------------------------------------------------------------------------


def test_mosquitto_qos1_round_trip(mosquitto: Mosquitto) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    with Probe(mosquitto, "sub") as sub, Probe(mosquitto, "pub") as pub:
        sub.subscribe("meshwatch/test/+/reading", qos=1)
        pub.publish("meshwatch/test/m1/reading", b'{"flow": 1.5}', qos=1)
        msg = sub.receive()
    assert (msg.topic, msg.payload, msg.qos) == ("meshwatch/test/m1/reading", b'{"flow": 1.5}', 1)


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_mosquitto_keeps_retained_and_queued_messages_across_restart(
    mosquitto: Mosquitto, how: str
) -> None:
    """A retained message and a QoS1 message queued for an offline persistent session."""
    # A persistent session subscribes, then goes offline. clean_start=False from the very first
    # connect: see test_mosquitto_does_not_persist_sessions_begun_with_clean_start.
    with Probe(mosquitto, "bridge", clean_start=False, session_expiry=3600) as bridge:
        assert bridge.session_present is False
        bridge.subscribe("meshwatch/queued", qos=1)
    with Probe(mosquitto, "publisher") as pub:
        pub.publish("meshwatch/retained", b"config-v1", retain=True)
        pub.publish("meshwatch/queued", b"reading-1")
    acked_at = time.time_ns()

    old_pid = mosquitto.pid
    assert old_pid is not None
    if how == "stop":
        mosquitto.stop()  # a clean stop saves the in-memory database
    else:
        db = mosquitto.data_dir / "mosquitto.db"
        deadline = time.monotonic() + WAIT  # wait for an autosave after the PUBACKs
        while not (db.exists() and db.stat().st_mtime_ns > acked_at):
            assert time.monotonic() < deadline, "mosquitto did not autosave within 5 s"
            time.sleep(0.05)
        mosquitto.kill()
    assert not _process_group_alive(old_pid)
    mosquitto.start()

    with Probe(mosquitto, "bridge", clean_start=False, session_expiry=3600) as bridge:
        assert bridge.session_present is True
        queued = bridge.receive()  # no new SUBSCRIBE: the session kept it
    assert (queued.topic, queued.payload, queued.qos) == ("meshwatch/queued", b"reading-1", 1)

    with Probe(mosquitto, "late-reader") as reader:
        reader.subscribe("meshwatch/retained")
        retained = reader.receive()
    assert (retained.payload, retained.retain) == (b"config-v1", True)


def test_mosquitto_does_not_persist_sessions_begun_with_clean_start(mosquitto: Mosquitto) -> None:
    """Pins a mosquitto 2.0 trap: a session created by a CONNECT with clean_start=True is kept in
    memory (session expiry > 0) but not written to the persistence file, so a broker restart
    loses it and its queued messages. paho's default (clean_start=MQTT_CLEAN_START_FIRST_ONLY)
    does exactly that on the first connect. Persistent subscribers must connect with
    clean_start=False every time. If this test fails, mosquitto changed: update the note.
    """
    with Probe(mosquitto, "fresh", clean_start=True, session_expiry=3600) as client:
        client.subscribe("meshwatch/queued")
    with Probe(mosquitto, "fresh", clean_start=False, session_expiry=3600) as client:
        assert client.session_present is True  # kept in memory...
    mosquitto.restart()
    with Probe(mosquitto, "fresh", clean_start=False, session_expiry=3600) as client:
        assert client.session_present is True  # ...and saved once a clean_start=False connect
    with Probe(mosquitto, "never-reconnected", clean_start=True, session_expiry=3600) as client:
        client.subscribe("meshwatch/queued")
    mosquitto.restart()
    with Probe(mosquitto, "never-reconnected", clean_start=False, session_expiry=3600) as client:
        assert client.session_present is False  # lost


# -- VictoriaMetrics -----------------------------------------------------------------------


def test_victoria_metrics_takes_influx_client_writes(victoria_metrics: VictoriaMetrics) -> None:
    points = [
        Point("water")
        .tag("meter", meter)
        .field("flow", 1.0 + i)
        .field("pressure", 3.0 + i / 10)
        .time(T0 + timedelta(seconds=10 * i), WritePrecision.MS)
        for meter in ("m1", "m2")
        for i in range(3)
    ]
    with InfluxDBClient(url=victoria_metrics.url, token="x", org="o") as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="telemetry", record=points)
    victoria_metrics.force_flush()

    series = victoria_metrics.export('{__name__=~"water_.*"}')
    by_key = {(s["metric"]["__name__"], s["metric"]["meter"]): s for s in series}
    assert sorted(by_key) == [
        ("water_flow", "m1"),
        ("water_flow", "m2"),
        ("water_pressure", "m1"),
        ("water_pressure", "m2"),
    ]
    t0_ms = int(T0.timestamp() * 1000)
    flow = by_key[("water_flow", "m2")]
    assert flow["values"] == [1.0, 2.0, 3.0]
    assert flow["timestamps"] == [t0_ms, t0_ms + 10_000, t0_ms + 20_000]
    assert by_key[("water_pressure", "m1")]["values"] == pytest.approx([3.0, 3.1, 3.2])


def test_victoria_metrics_shows_fresh_samples(victoria_metrics: VictoriaMetrics) -> None:
    """Samples stamped "now" may need ~1 s after force_flush: wait_for_samples polls."""
    before_ms = time.time_ns() // 10**6
    with InfluxDBClient(url=victoria_metrics.url, token="x", org="o") as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            bucket="telemetry", record="pump,station=p1 running=1i,rpm=1450.5"
        )
    [series] = victoria_metrics.wait_for_samples("pump_rpm", 1)
    assert series["metric"] == {"__name__": "pump_rpm", "station": "p1"}
    assert series["values"] == [1450.5]
    assert before_ms <= series["timestamps"][0] <= time.time_ns() // 10**6
    with pytest.raises(ServerError, match="holds 0 of 1 expected samples"):
        victoria_metrics.wait_for_samples("pump_missing", 1, timeout=0.2)


def test_victoria_metrics_keeps_data_across_restart(victoria_metrics: VictoriaMetrics) -> None:
    t0_ns = int(T0.timestamp()) * 10**9
    body = "\n".join(f"tank,site=s1 level={i}.5 {t0_ns + i * 10**9}" for i in range(5))
    request = urllib.request.Request(f"{victoria_metrics.url}/write", data=body.encode())
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert response.status == 204

    victoria_metrics.restart()  # no force_flush: a clean stop must persist buffered rows

    [series] = victoria_metrics.export("tank_level")
    assert series["metric"] == {"__name__": "tank_level", "site": "s1"}
    assert series["values"] == [0.5, 1.5, 2.5, 3.5, 4.5]


# -- InfluxDB 1.x --------------------------------------------------------------------------


def test_influxdb_write_and_influxql_aggregate(influxdb: InfluxDB1, influxdb_db: str) -> None:
    t0 = int(T0.timestamp())
    lines = [f"water,meter=m1 flow={v} {t0 + 10 * i}" for i, v in enumerate([1, 2, 3, 10, 20, 30])]
    lines.append(f"water,meter=m2 flow=100 {t0}")
    influxdb.write(influxdb_db, lines, precision="s")

    answer = influxdb.query(
        influxdb_db,
        "SELECT mean(flow), count(flow) FROM water WHERE meter = 'm1' AND "
        f"time >= {t0}s AND time < {t0 + 60}s GROUP BY time(30s)",
        epoch="s",
    )
    [series] = answer["results"][0]["series"]
    assert series["columns"] == ["time", "mean", "count"]
    assert series["values"] == [[t0, 2, 3], [t0 + 30, 20, 3]]


def test_influxdb_reports_bad_line_protocol(influxdb: InfluxDB1, influxdb_db: str) -> None:
    with pytest.raises(ServerError, match="unable to parse"):
        influxdb.write(influxdb_db, "water flow=")


# -- PostgreSQL ----------------------------------------------------------------------------


def test_postgres_sql_through_sqlalchemy(postgres_db: str) -> None:
    engine = sa.create_engine(postgres_db)
    meta = sa.MetaData()
    readings = sa.Table(
        "readings",
        meta,
        sa.Column("meter", sa.Text, primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("flow", sa.Float, nullable=False),
    )
    try:
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(readings),
                [
                    {"meter": "m1", "ts": T0, "flow": 1.5},
                    {"meter": "m1", "ts": T0 + timedelta(minutes=1), "flow": 2.5},
                    {"meter": "m2", "ts": T0, "flow": 9.0},
                ],
            )
        with engine.connect() as conn:
            database = conn.scalar(sa.text("SELECT current_database()"))
            rows = conn.execute(
                sa.select(
                    readings.c.meter, sa.func.avg(readings.c.flow), sa.func.max(readings.c.ts)
                )
                .group_by(readings.c.meter)
                .order_by(readings.c.meter)
            ).all()
    finally:
        engine.dispose()
    assert postgres_db.endswith(f"/{database}")
    assert database != "postgres"  # isolation: a database of our own
    assert [tuple(row) for row in rows] == [
        ("m1", 2.0, T0 + timedelta(minutes=1)),
        ("m2", 9.0, T0),
    ]


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_postgres_keeps_rows_across_restart(tmp_path: Path, how: str) -> None:
    with PostgreSQL(tmp_path) as server:
        assert server.url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/postgres"
        engine = sa.create_engine(server.url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE incidents (id int PRIMARY KEY, title text)"))
            conn.execute(sa.text("INSERT INTO incidents VALUES (1, 'leak'), (2, 'burst')"))
        engine.dispose()

        old_pid, port = server.pid, server.port
        assert old_pid is not None
        server.stop() if how == "stop" else server.kill()
        assert not server.running
        assert not _process_group_alive(old_pid), "postgres left processes behind"
        server.start()
        assert server.port == port

        engine = sa.create_engine(server.url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, title FROM incidents ORDER BY id")).all()
        engine.dispose()
    assert [tuple(row) for row in rows] == [(1, "leak"), (2, "burst")]
    assert not server.data_dir.exists(), "close() should remove the cluster directory"


# -- the harness itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "package"),
    [
        (Mosquitto, "mosquitto"),
        (VictoriaMetrics, "victoria-metrics"),
        (InfluxDB1, "influxdb"),
        (PostgreSQL, "postgresql-15"),
    ],
)
def test_missing_binary_names_the_debian_package(
    tmp_path: Path, cls: type[Server], package: str
) -> None:
    with pytest.raises(MissingBinaryError, match=f"apt-get install {package}"):
        cls(tmp_path, binary=tmp_path / "no-such-binary")


def test_server_that_exits_at_start_reports_its_code(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="exited with code 1"):
        Mosquitto(tmp_path, binary="/bin/false").start()


def test_server_that_never_answers_times_out_with_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-mosquitto"
    fake.write_text('#!/bin/sh\necho "fake broker listening nowhere"\nexec sleep 60\n')
    fake.chmod(0o755)
    server = Mosquitto(tmp_path, binary=fake, ready_timeout=0.5)
    with pytest.raises(ServerError, match=r"(?s)within 0\.5s.*fake broker listening nowhere"):
        server.start()
    assert not server.running
    assert server.pid is None


def test_stop_is_idempotent_and_restart_keeps_port(tmp_path: Path) -> None:
    server = VictoriaMetrics(tmp_path)
    server.stop()  # never started: nothing to do
    with server:
        port, pid = server.port, server.pid
        assert pid is not None
        server.restart()
        assert server.port == port
        assert server.pid != pid
        with pytest.raises(ServerError, match="already running"):
            server.start()
    assert not server.running
    server.stop()
    assert not os.path.exists(f"/proc/{pid}")
