"""Remediation storage, correlation and life cycle, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from remediation_support import T0, alert, count, counts, database_url, new_store
from sqlalchemy import select
from sqlalchemy.orm import Session

from meshwatch.contract import Feedback, WorkOrderEvent, decode
from remediation.db import OutboxRow, TransitionRow, WorkOrderRow
from remediation.store import Incoming, NotFoundError, Store
from remediation.workorders import TransitionError

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path)


@pytest.fixture
def store(db_url: str):
    store = new_store(db_url)
    yield store
    store.engine.dispose()


def _ingest(store: Store, *alerts, district: str | None = None):
    return store.ingest([Incoming(alert=a, district=district or a.district) for a in alerts])


def test_redelivered_alerts_change_nothing(store: Store) -> None:
    first = alert("a-1", kind="burst", severity="major")
    result = _ingest(store, first)
    assert (result.stored, result.incidents) == (1, 1)
    before = counts(store.engine)
    for _ in range(3):
        again = _ingest(store, first, first)
        assert (again.stored, again.duplicates, again.incidents) == (0, 2, 0)
    assert counts(store.engine) == before == {"alerts": 1, "incidents": 1, "work_orders": 1,
                                              "outbox": 1}  # "assigned" to crew-a's topic


def test_burst_and_customer_anomalies_are_one_incident(store: Store) -> None:
    _ingest(store, alert("burst-1", kind="burst", severity="major", loss=1200.0))
    anomalies = [alert(f"an-{i}", device_id=f"mtr-{i}", kind="anomaly", loss=None,
                       ts=T0 + i * 60_000) for i in range(20)]
    result = _ingest(store, *anomalies)
    assert (result.incidents, result.joined) == (0, 20)
    other = _ingest(store, alert("d2-leak", district="dma-02", device_id="mtr-x"))
    assert other.incidents == 1
    far = _ingest(store, alert("late", kind="burst", ts=T0 + 48 * 3600 * 1000))
    assert far.incidents == 1, "outside the correlation window: a new incident"
    assert counts(store.engine)["work_orders"] == 3


def test_anomalies_first_then_burst_still_one_incident(store: Store) -> None:
    _ingest(store, alert("an-1", device_id="mtr-1", kind="anomaly", loss=None))
    _ingest(store, alert("an-2", device_id="mtr-2", kind="anomaly", loss=None, ts=T0 + 1000))
    result = _ingest(store, alert("burst", kind="burst", severity="critical", ts=T0 + 2000))
    assert result.incidents == 0
    total, items = store.incidents()
    assert total == 1
    assert (items[0]["kind"], items[0]["device_id"], items[0]["alert_count"]) == ("burst", None, 3)


def test_two_leaks_of_two_customers_are_two_incidents(store: Store) -> None:
    result = _ingest(store, alert("l-1", device_id="mtr-1"), alert("l-2", device_id="mtr-2"))
    assert result.incidents == 2


def test_new_evidence_escalates_priority_and_is_audited(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1", severity="minor", loss=50.0))
    (wo,) = store.list_work_orders()[1]
    assert wo["priority"] == 3
    update = alert("a-1", device_id="mtr-1", severity="critical", loss=2500.0, ts=T0 + 60_000,
                   status="update")
    result = _ingest(store, update)
    assert (result.stored, result.escalated) == (1, 1)
    detail = store.work_order(wo["work_order_id"])
    assert detail["priority"] == 1
    assert detail["ack_due_ms"] < wo["ack_due_ms"]
    assert [t["event"] for t in detail["audit"]] == ["created", "assigned", "escalated"]
    assert "priority 3 → 1" in detail["audit"][-1]["reason"]


def test_life_cycle_audit_feedback_once(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"), alert("a-2", device_id="mtr-1", ts=T0 + 5))
    (wo,) = store.list_work_orders()[1]
    wid = wo["work_order_id"]
    assert (wo["state"], wo["crew_id"]) == ("assigned", "crew-a")
    with pytest.raises(TransitionError, match="cannot go from assigned to resolved"):
        store.transition(wid, "resolved", actor="crew:crew-a", role="crew",
                         crew_scope="crew-a", outcome="confirmed_leak")
    with pytest.raises(NotFoundError):
        store.transition(wid, "acknowledged", actor="crew:crew-b", role="crew",
                         crew_scope="crew-b")
    store.transition(wid, "acknowledged", actor="crew:crew-a", role="crew", crew_scope="crew-a")
    store.transition(wid, "in_progress", actor="crew:crew-a", role="crew", crew_scope="crew-a")
    with pytest.raises(TransitionError, match="resolving needs an outcome"):
        store.transition(wid, "resolved", actor="crew:crew-a", role="crew", crew_scope="crew-a")
    done = store.transition(wid, "resolved", actor="crew:crew-a", role="crew",
                            crew_scope="crew-a", outcome="confirmed_leak", note="joint replaced")
    assert (done["state"], done["outcome"]) == ("resolved", "confirmed_leak")
    with pytest.raises(TransitionError, match="cannot go from resolved"):
        store.transition(wid, "in_progress", actor="operator", role="operator")
    with Session(store.engine) as session:
        audit = session.execute(select(TransitionRow.actor, TransitionRow.to_state).where(
            TransitionRow.work_order_id == wid).order_by(TransitionRow.id)).all()
        feedback = session.scalars(select(OutboxRow).where(
            OutboxRow.dedupe_key.like("feedback:%"))).all()
    assert [tuple(row) for row in audit] == [
        ("system", "open"), ("system", "assigned"), ("crew:crew-a", "acknowledged"),
        ("crew:crew-a", "in_progress"), ("crew:crew-a", "resolved")]
    assert len(feedback) == 1
    event = decode(feedback[0].payload, Feedback)
    assert feedback[0].topic == "mw/v1/feedback/dma-01"
    assert (event.work_order_id, event.outcome.value, sorted(event.alert_ids)) == (
        wid, "confirmed_leak", ["a-1", "a-2"])
    # a redelivered alert after the repair changes nothing
    assert _ingest(store, alert("a-1", device_id="mtr-1")).duplicates == 1
    assert count(store.engine, WorkOrderRow) == 1


def test_false_alarm_then_new_evidence_reopens(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    (wo,) = store.list_work_orders()[1]
    store.transition(wo["work_order_id"], "false_alarm", actor="crew:crew-a", role="crew",
                     crew_scope="crew-a")
    assert store.incidents(state="open")[0] == 0
    result = _ingest(store, alert("a-9", device_id="mtr-1", ts=T0 + 3600_000))
    assert (result.incidents, result.joined) == (0, 1)
    detail = store.work_order(wo["work_order_id"])
    assert detail["state"] == "assigned"
    assert [t["event"] for t in detail["audit"]][-2:] == ["reopened", "assigned"]
    assert count(store.engine, OutboxRow, OutboxRow.dedupe_key.like("feedback:%")) == 1


def test_sla_escalates_once_per_level(db_url: str) -> None:
    now = [T0]
    store = new_store(db_url)
    store.clock = lambda: now[0]
    _ingest(store, alert("a-1", device_id="mtr-1", severity="critical"))
    assert store.check_sla() == 0
    now[0] += 16 * 60_000  # past the 15 min acknowledge SLA of priority 1
    assert store.check_sla() == 1
    assert store.check_sla() == 0
    now[0] += 5 * 3600_000  # past the 4 h resolve SLA
    assert store.check_sla() == 1
    (wo,) = store.list_work_orders()[1]
    assert wo["escalation_level"] == 2
    keys = {r.dedupe_key.split(":", 2)[2] for r in store.pending("mqtt")}
    assert {"escalated:sla1", "escalated:sla2"} <= keys
    store.engine.dispose()


def test_malformed_alert_becomes_one_dead_letter(store: Store) -> None:
    from remediation.store import dead_letter_for

    letter = dead_letter_for(b"{not json", reason="malformed_json", detail="x",
                             topic="mw/v1/alerts/dma-01/leak", client_id="t", received_ms=T0)
    assert store.ingest([Incoming(dead_letter=letter)]).dead_letters == 1
    assert store.ingest([Incoming(dead_letter=letter)]).dead_letters == 0
    (row,) = store.pending("mqtt")
    assert row.topic == "mw/v1/deadletter/malformed_json"


def _stream(n_incidents: int) -> list:
    alerts = []
    for i in range(n_incidents):
        district = f"dma-{i % 7:02d}"
        base = T0 + (i // 7) * 86_400_000  # a day apart within a district: separate incidents
        alerts.append(alert(f"s-{i}-0", district=district, kind="burst", ts=base))
        alerts += [alert(f"s-{i}-{j}", district=district, device_id=f"m-{i}-{j}",
                         kind="anomaly", loss=None, ts=base + j * 1000) for j in range(1, 4)]
    return alerts


@pytest.mark.parametrize("db_url", BACKENDS, indirect=True)
def test_racing_consumers_never_double_a_work_order(db_url: str) -> None:
    """Two consumers (own engines, own connections) ingest the same stream concurrently."""
    stream = _stream(40)
    stores = [new_store(db_url) for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def consume(store: Store, seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for i in range(0, len(stream), 10):
                batch = stream[i:i + 10]
                rng.shuffle(batch)
                _ingest(store, *batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = counts(stores[0].engine)
    assert (got["alerts"], got["incidents"], got["work_orders"]) == (160, 40, 40)
    for store in stores:
        store.engine.dispose()


def test_operator_reassigns_and_unknown_crews_are_refused(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    (wo,) = store.list_work_orders()[1]
    wid = wo["work_order_id"]
    with pytest.raises(TransitionError, match="needs a known crew_id; crews: crew-a, crew-b"):
        store.transition(wid, "assigned", actor="operator", role="operator", crew_id="nobody")
    with pytest.raises(TransitionError, match="a crew cannot go from assigned to assigned"):
        store.transition(wid, "assigned", actor="crew:crew-a", role="crew",
                         crew_scope="crew-a", crew_id="crew-b")
    moved = store.transition(wid, "assigned", actor="operator", role="operator",
                             crew_id="crew-b", note="crew-a is on the burst")
    assert moved["crew_id"] == "crew-b"
    assert store.list_work_orders(crew_scope="crew-a")[0] == 0
    keys = sorted(r.dedupe_key for r in store.pending("mqtt"))
    assert len([k for k in keys if ":assigned:" in k]) == 2  # crew-a's, then crew-b's topic
    assert {r.topic for r in store.pending("mqtt")} == {
        "mw/v1/crews/crew-a/work_orders", "mw/v1/crews/crew-b/work_orders"}


def test_an_update_after_the_repair_does_not_touch_the_closed_work_order(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    (wo,) = store.list_work_orders()[1]
    wid = wo["work_order_id"]
    for state, outcome in (("acknowledged", None), ("in_progress", None),
                           ("resolved", "confirmed_leak")):
        store.transition(wid, state, actor="operator", role="operator", outcome=outcome)
    before = store.work_order(wid)
    later = alert("a-1", device_id="mtr-1", severity="critical", ts=T0 + 3600_000,
                  status="update")
    assert _ingest(store, later).stored == 1
    after = store.work_order(wid)
    assert (after["state"], after["priority"], len(after["audit"])) == (
        "resolved", before["priority"], len(before["audit"]))


def test_one_batch_opens_joins_and_escalates_naming_every_alert(store: Store) -> None:
    """Rows created in a batch are found by the rest of it (they are inserted at commit)."""
    evidence = {"category": "burst", "flow_lph": [410.5, 1220.0], "night": None}
    result = _ingest(store, alert("b-1", kind="burst", severity="minor", loss=100.0,
                                  evidence=evidence),
                     alert("an-1", device_id="mtr-1", kind="anomaly", loss=None, ts=T0 + 1000),
                     alert("b-2", kind="burst", severity="critical", loss=2000.0, ts=T0 + 2000))
    assert (result.incidents, result.joined, result.escalated) == (1, 2, 1)
    (row,) = [r for r in store.pending("mqtt") if ":escalated:" in r.dedupe_key]
    assert decode(row.payload, WorkOrderEvent).alert_ids == ["b-2", "an-1", "b-1"]
    (incident,) = store.incidents()[1]
    assert (incident["alert_count"], incident["severity"]) == (3, "critical")
    detail = store.work_order(incident["work_order_id"])
    assert [t["event"] for t in detail["audit"]] == ["created", "assigned", "escalated"]
    assert sorted(a["alert_id"] for a in detail["alerts"]) == ["an-1", "b-1", "b-2"]
    assert detail["alerts"][0]["evidence"] == evidence  # JSON through COPY on PostgreSQL
