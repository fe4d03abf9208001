"""Cleared alerts: incidents clear, undispatched work orders cancel, the condition coming back
reopens; on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from remediation_support import T0, alert, count, database_url, new_store
from sqlalchemy.orm import Session

from meshwatch.contract import WorkOrderEvent, decode, topics
from remediation.db import IncidentRow, OutboxRow
from remediation.store import Incoming, IngestResult, Store

MINUTE = 60_000


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    store = new_store(database_url(request, tmp_path))
    yield store
    store.engine.dispose()


def _ingest(store: Store, *alerts) -> IngestResult:
    return store.ingest([Incoming(alert=a, district=a.district) for a in alerts])


def _cleared(alert_id: str, ts: int, **kwargs) -> object:
    return alert(alert_id, ts=ts, status="cleared", **kwargs)


def _only_work_order(store: Store) -> dict:
    (wo,) = store.list_work_orders()[1]
    return store.work_order(wo["work_order_id"])


def _incident(store: Store, incident_id: str) -> IncidentRow:
    with Session(store.engine) as session:
        incident = session.get(IncidentRow, incident_id)
        assert incident is not None
        return incident


def test_a_clear_before_dispatch_cancels_audited_and_tells_the_crew(store: Store) -> None:
    opened = alert("a-1", device_id="mtr-1")
    _ingest(store, opened)
    assert _only_work_order(store)["state"] == "assigned"
    clear = alert("a-1", device_id="mtr-1", ts=T0 + 30 * MINUTE, status="cleared")
    result = _ingest(store, clear)
    assert (result.stored, result.cleared, result.cancelled) == (1, 1, 1)
    wo = _only_work_order(store)
    assert (wo["state"], wo["incident"]["state"]) == ("cancelled", "closed")
    assert wo["incident"]["cleared_ms"] is not None
    last = wo["audit"][-1]
    assert (last["actor"], last["from_state"], last["to_state"]) == (
        "system", "assigned", "cancelled")
    assert last["reason"] == "condition cleared before dispatch: alert a-1 cleared"
    (notice,) = [row for row in store.pending("mqtt") if ":transition:" in row.dedupe_key]
    assert notice.topic == topics.crew_work_orders("crew-a")
    event = decode(notice.payload, WorkOrderEvent)
    assert (event.event, event.state.value, event.alert_ids) == ("transition", "cancelled",
                                                                 ["a-1"])
    assert "condition cleared before dispatch" in (event.note or "")
    # redelivered clear and open: duplicates, nothing moves
    outbox = count(store.engine, OutboxRow)
    again = _ingest(store, clear, opened)
    assert (again.stored, again.duplicates, again.cleared) == (0, 2, 0)
    assert len(_only_work_order(store)["audit"]) == len(wo["audit"])
    assert count(store.engine, OutboxRow) == outbox


def test_nothing_happens_while_another_alert_of_the_incident_is_active(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"), alert("a-2", device_id="mtr-1", ts=T0 + 5))
    first = _ingest(store, _cleared("a-1", T0 + MINUTE, device_id="mtr-1"))
    assert (first.stored, first.cleared) == (1, 0)
    wo = _only_work_order(store)
    assert (wo["state"], wo["incident"]["cleared_ms"]) == ("assigned", None)
    assert [a["status"] for a in wo["alerts"]] == ["cleared", "open"]
    second = _ingest(store, _cleared("a-2", T0 + 2 * MINUTE, device_id="mtr-1"))
    assert (second.cleared, second.cancelled) == (1, 1)
    wo = _only_work_order(store)
    assert wo["state"] == "cancelled"
    assert wo["audit"][-1]["reason"] == (
        "condition cleared before dispatch: all 2 alerts cleared (last a-2)")


def test_a_clear_after_dispatch_is_left_to_the_crew_and_annotated(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    wid = _only_work_order(store)["work_order_id"]
    for state in ("acknowledged", "in_progress"):
        store.transition(wid, state, actor="crew:crew-a", role="crew", crew_scope="crew-a")
    result = _ingest(store, _cleared("a-1", T0 + MINUTE, device_id="mtr-1"))
    assert (result.cleared, result.cancelled) == (1, 0)
    wo = _only_work_order(store)
    assert (wo["state"], wo["incident"]["state"]) == ("in_progress", "open")
    assert wo["incident"]["cleared_ms"] is not None
    last = wo["audit"][-1]
    assert (last["event"], last["from_state"], last["to_state"]) == (
        "cleared", "in_progress", "in_progress")
    assert last["reason"] == "condition cleared after dispatch: alert a-1 cleared; left to the crew"
    done = store.transition(wid, "resolved", actor="crew:crew-a", role="crew",
                            crew_scope="crew-a", outcome="confirmed_leak")
    assert done["state"] == "resolved"  # the crew still closes it with what it found


def test_a_new_alert_after_the_clear_reopens_the_cancelled_work_order(store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    _ingest(store, _cleared("a-1", T0 + MINUTE, device_id="mtr-1"))
    result = _ingest(store, alert("a-2", device_id="mtr-1", ts=T0 + 60 * MINUTE))
    assert (result.incidents, result.joined) == (0, 1)
    wo = _only_work_order(store)
    assert (wo["state"], wo["crew_id"], wo["incident"]["state"]) == (
        "assigned", "crew-a", "open")
    assert wo["incident"]["cleared_ms"] is None
    assert [t["event"] for t in wo["audit"]][-3:] == ["transition", "reopened", "assigned"]


def test_the_same_alert_active_again_reopens_and_a_second_clear_cancels_again(
        store: Store) -> None:
    _ingest(store, alert("a-1", device_id="mtr-1"))
    _ingest(store, _cleared("a-1", T0 + MINUTE, device_id="mtr-1"))
    back = alert("a-1", device_id="mtr-1", ts=T0 + 20 * MINUTE, status="update")
    _ingest(store, back)
    wo = _only_work_order(store)
    assert wo["state"] == "assigned"
    assert _incident(store, wo["incident_id"]).cleared_ms is None
    again = _ingest(store, _cleared("a-1", T0 + 40 * MINUTE, device_id="mtr-1"))
    assert again.cancelled == 1
    wo = _only_work_order(store)
    assert [t["to_state"] for t in wo["audit"]] == [
        "open", "assigned", "cancelled", "open", "assigned", "cancelled"]
    notices = [r for r in store.pending("mqtt") if ":transition:" in r.dedupe_key]
    assert len(notices) == 2  # one per cancellation, each told to the crew


def test_open_and_clear_in_one_batch_and_a_clear_never_seen_open(store: Store) -> None:
    result = _ingest(store, alert("a-1", device_id="mtr-1"),
                     _cleared("a-1", T0 + MINUTE, device_id="mtr-1"),
                     _cleared("z-9", T0, device_id="mtr-9"))
    assert (result.stored, result.incidents, result.cleared, result.cancelled) == (3, 1, 1, 1)
    assert _only_work_order(store)["state"] == "cancelled"
    assert store.incidents(state=None)[0] == 1  # the unknown clear opened nothing


def test_an_alert_first_seen_cleared_opens_an_incident_when_it_turns_active(
        store: Store) -> None:
    """Its stored row joins an incident created in the same transaction (inserted at commit)."""
    _ingest(store, _cleared("a-1", T0, device_id="mtr-1"))
    assert store.incidents(state=None)[0] == 0
    result = _ingest(store, alert("a-1", device_id="mtr-1", ts=T0 + MINUTE, status="update"))
    assert (result.stored, result.incidents) == (1, 1)
    wo = _only_work_order(store)
    assert (wo["state"], [a["alert_id"] for a in wo["alerts"]]) == ("assigned", ["a-1"])
