"""Delivery guarantees of remediation: acks after commit, racing consumers, webhook retries."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remediation_support import (
    T0,
    alert,
    count,
    database_url,
    new_store,
    publish_all,
    publisher,
    service_config,
    wait_for,
)
from servers import Mosquitto, free_port
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from meshwatch.contract import encode, topics
from remediation.command import Service
from remediation.db import IncidentRow, OutboxRow, WorkOrderRow
from remediation.intake import AlertIntake
from remediation.store import Incoming

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path)


def test_schema_refuses_a_second_work_order_for_an_incident(db_url: str) -> None:
    store = new_store(db_url)
    store.ingest([Incoming(alert=alert("a-1", device_id="m-1"))])
    with Session(store.engine) as session:
        incident = session.query(IncidentRow).one()
        assert session.query(WorkOrderRow).one().incident_id == incident.incident_id
        session.add(WorkOrderRow(
            work_order_id="wo-second", incident_id=incident.incident_id, state="open",
            priority=3, skill="pipes", district="dma-01", created_ms=T0, ack_due_ms=T0,
            resolve_due_ms=T0, escalation_level=0, closures=0))
        with pytest.raises(IntegrityError, match="incident_id"):
            session.commit()
    store.engine.dispose()


def test_two_services_on_postgres_consume_the_same_alerts(tmp_path: Path, mosquitto: Mosquitto,
                                                          postgres_db: str) -> None:
    """Two consumers (own MQTT sessions, so each gets every alert) race on one database."""
    services = []
    for name in ("rem-1", "rem-2"):
        config = service_config(tmp_path, postgres_db, mosquitto.url, free_port(),
                                client_id=name, batch_max=25)
        services.append(Service(config).start())
    try:
        for s in services:
            wait_for(lambda s=s: s.intake.connected, what="connected")
        time.sleep(0.3)
        stream = []
        for i in range(100):  # 100 incidents: a burst and 4 customer anomalies each
            district = f"dma-{i % 10:02d}"
            base = T0 + (i // 10) * 86_400_000
            stream.append(alert(f"b-{i}", district=district, kind="burst", ts=base))
            stream += [alert(f"n-{i}-{j}", district=district, device_id=f"m-{i}-{j}",
                             kind="anomaly", loss=None, ts=base + j) for j in range(4)]
        pub = publisher(mosquitto)
        publish_all(pub, [(topics.alerts(a.district or "", a.kind.value), encode(a))
                          for a in stream])
        wait_for(lambda: all(s.intake.stored + s.intake.duplicates >= 500 for s in services),
                 60, "both consumers saw every alert")
        engine = services[0].engine
        assert count(engine, WorkOrderRow) == 100
        assert count(engine, IncidentRow) == 100
        assert sum(s.intake.stored for s in services) == 500  # each alert stored once
        pub.loop_stop()
    finally:
        for s in services:
            s.stop()


def test_committed_alerts_are_acknowledged(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A clean restart gets nothing again: every PUBACK went out after its commit."""
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port())
    first = Service(config).start()
    wait_for(lambda: first.intake.connected, what="connected")
    pub = publisher(mosquitto)
    publish_all(pub, [(topics.alerts("dma-01", "leak"), encode(alert(f"a-{i}", device_id=f"m{i}")))
                      for i in range(200)])
    wait_for(lambda: first.intake.stored == 200, 30, "stored")
    time.sleep(0.3)
    first.stop()
    second = Service(config).start()
    try:
        wait_for(lambda: second.intake.connected, what="connected again")
        time.sleep(1.0)
        assert (second.intake.stored, second.intake.duplicates) == (0, 0)
    finally:
        second.stop()
        pub.loop_stop()


class _FlakyHook(BaseHTTPRequestHandler):
    failures_left = 2
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        if cls.failures_left > 0:
            cls.failures_left -= 1
            self.send_response(503)
        else:
            cls.received.append((self.headers["Idempotency-Key"], body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_webhook_is_retried_with_backoff(tmp_path: Path, mosquitto: Mosquitto) -> None:
    _FlakyHook.failures_left, _FlakyHook.received = 2, []
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    config = service_config(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", mosquitto.url,
                            free_port(), webhook_url=f"http://127.0.0.1:{hook.server_port}/h",
                            webhook_backoff_max_s=1.0)
    service = Service(config).start()
    try:
        service.store.ingest([Incoming(alert=alert("a-1", device_id="m-1"))])
        wait_for(lambda: len(_FlakyHook.received) == 2, 20, "both webhooks delivered")
        assert sorted(body["event"] for _, body in _FlakyHook.received) == [
            "assigned", "created"]

        def rows() -> list[OutboxRow]:
            with Session(service.engine) as session:
                return session.query(OutboxRow).filter(OutboxRow.channel == "webhook").all()

        wait_for(lambda: all((row.sent_ms or 0) > 0 for row in rows()), 10, "marked sent")
        assert len(rows()) == 2
        assert sum(row.attempts for row in rows()) == 2  # the two 503s
    finally:
        service.stop()
        hook.shutdown()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from(["mw/v1/alerts/dma-01/leak", "mw/v1/alerts/x/y", "bad/topic",
                              "mw/v1/feedback/dma-01"]),
       payload=st.one_of(st.binary(max_size=300),
                         st.builds(lambda a: encode(a), st.just(alert("p-1"))),
                         st.dictionaries(st.sampled_from(["type", "alert_id", "kind", "score"]),
                                         st.one_of(st.text(max_size=5), st.integers()))
                         .map(lambda d: json.dumps(d).encode())))
def test_any_message_becomes_an_alert_or_a_dead_letter(topic: str, payload: bytes) -> None:
    intake = AlertIntake.__new__(AlertIntake)
    intake.client_id = "prop"
    item = intake.incoming(topic, payload)
    assert (item.alert is None) != (item.dead_letter is None)
    if item.dead_letter is not None:
        assert item.dead_letter.reason
        assert topics.dead_letter(item.dead_letter.reason)
    else:
        assert item.district == topic.split("/")[3]


def test_webhook_gives_up_after_its_retries(tmp_path: Path) -> None:
    from remediation.notify import OutboxSender
    from remediation.store import Settings

    store = new_store(f"sqlite:///{tmp_path / 'r.db'}")
    store.settings = Settings(webhook=True)
    now = [T0]
    store.clock = lambda: now[0]
    store.ingest([Incoming(alert=alert("a-1", device_id="m-1"))])
    sender = OutboxSender(store, None, client_id="t", webhook_url=f"http://127.0.0.1:{free_port()}/",
                          webhook_retries=2, webhook_backoff_max_s=1.0)
    for _ in range(3):  # nothing listens: refused each time
        assert sender.send_webhooks() == 0
        now[0] += 60_000  # past any back-off
    with Session(store.engine) as session:
        rows = session.query(OutboxRow).filter(OutboxRow.channel == "webhook").all()
    assert len(rows) == 2
    assert all(row.sent_ms == -1 and row.attempts == 3 for row in rows)
    assert "Connection refused" in (rows[0].last_error or "")
    assert sender.send_webhooks() == 0
    store.engine.dispose()
