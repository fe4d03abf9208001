"""Helpers of the remediation tests: alerts, databases on both back-ends, a service config."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from servers import Mosquitto
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from meshwatch.config import Config
from meshwatch.contract import Alert
from remediation.assign import Crew
from remediation.db import AlertRow, IncidentRow, OutboxRow, WorkOrderRow, make_engine, upgrade
from remediation.store import Settings, Store

T0 = 1_767_225_600_000
CREWS = [Crew("crew-a", ("dma-01",), ("pipes", "meters"), 50),
         Crew("crew-b", ("dma-02",), ("pipes", "meters"), 50)]
TOKENS = {"operator": "op-token-1", "crew-a": "crew-a-token", "crew-b": "crew-b-token"}


def alert(alert_id: str, *, district: str | None = "dma-01", device_id: str | None = None,
          kind: str = "leak", severity: str = "minor", loss: float | None = 100.0,
          ts: int = T0, status: str = "open", evidence: dict[str, Any] | None = None) -> Alert:
    return Alert(alert_id=alert_id, district=district, device_id=device_id, kind=kind,
                 severity=severity, status=status, score=0.9, est_loss_lph=loss,
                 first_ts_ms=ts, last_ts_ms=ts, model_version="m1",
                 evidence=evidence or {})


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_db")
        return url
    return f"sqlite:///{tmp_path / 'remediation.db'}"


def new_store(url: str, crews: list[Crew] | None = None, **settings: Any) -> Store:
    engine = make_engine(url)
    upgrade(engine)
    return Store(engine, Settings(**settings), crews=CREWS if crews is None else crews)


def count(engine: Engine, table: type, *where: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def counts(engine: Engine) -> dict[str, int]:
    return {"alerts": count(engine, AlertRow), "incidents": count(engine, IncidentRow),
            "work_orders": count(engine, WorkOrderRow), "outbox": count(engine, OutboxRow)}


def service_config(tmp_path: Path, db_url: str, broker_url: str, port: int,
                   protocol: str = "5", **remediation: Any) -> Config:
    return Config(
        database={"url": db_url}, mesh_broker={"url": broker_url, "protocol": protocol},
        remediation={
            "http_port": port, "operator_tokens": [TOKENS["operator"]], "sla_check_s": 0.2,
            "crews": [{"crew_id": c.crew_id, "districts": list(c.districts),
                       "token": TOKENS[c.crew_id]} for c in CREWS],
            **remediation})


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class Recorder:
    """A QoS1 subscriber that keeps (topic, payload) of everything it gets."""

    def __init__(self, broker: Mosquitto, *filters: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        for f in filters:
            self.client.subscribe(f, qos=1)
        self.client.loop_start()
        time.sleep(0.2)

    def on(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.messages if t.startswith(prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publisher(broker: Mosquitto) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes]]) -> None:
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)
