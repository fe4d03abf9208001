"""Persistence of alerts, incidents, work orders, audit and outbox: every write in one place.

**Idempotent intake.** :meth:`Store.ingest` stores a batch of alerts in one transaction. An
alert already stored with the same or newer ``last_ts_ms`` is a duplicate and changes nothing;
a newer version (``update``, ``cleared``, later evidence) updates the alert and may escalate
its incident. Correlation decisions are serialised per district: PostgreSQL takes a
transaction-level advisory lock per district (in sorted order, so two consumers cannot
deadlock), SQLite takes its single write lock at ``BEGIN IMMEDIATE``. Ids are derived from the
first alert of an incident (``inc-``/``wo-`` + a hash of its id), and the schema's primary and
unique keys reject a second incident or work order for it even if the locks were bypassed; a
transaction that hits them is retried, and then finds the first one's rows.

**Cleared alerts.** A ``cleared`` version of an alert marks the alert cleared. When every
alert of an incident has cleared, the incident is marked cleared (``cleared_ms``) and its work
order follows what a dispatcher would do: one that no crew has acknowledged yet (``open`` or
``assigned``) is cancelled by ``system`` with the audited reason "condition cleared before
dispatch: ..." and the crew is told (a ``transition`` event on its topic); one a crew has
acknowledged or started is left to the crew, with a ``cleared`` audit entry ("condition
cleared after dispatch ...; left to the crew"), because a leak that stops showing in the data
may still need a repair; a closed one is not touched. While another alert of the incident is
still active nothing happens. The condition coming back reopens: a new alert joins the
incident as usual (a cancelled work order is reopened and assigned again, see
:mod:`remediation.correlate`), and so does a cleared alert that becomes active again (same
id, status ``open``/``update``); either way ``cleared_ms`` goes back to None. Redelivered
clears are duplicates and change nothing.

>>> from remediation.db import make_engine, upgrade
>>> engine = make_engine("sqlite://")
>>> upgrade(engine)
>>> store = Store(engine, crews=[Crew("crew-a", ("dma-01",), ("pipes",), 5)])
>>> leak = dict(alert_id="a-1", device_id="mtr-1", district="dma-01", kind="leak",
...             severity="minor", score=0.9, first_ts_ms=1767225600000,
...             last_ts_ms=1767225600000, model_version="m1")
>>> store.ingest([Incoming(alert=Alert(**leak))]).work_orders  # doctest: +ELLIPSIS
['wo-...']
>>> clear = Alert(**(leak | {"status": "cleared", "last_ts_ms": 1767227400000}))
>>> result = store.ingest([Incoming(alert=clear)])
>>> result.cleared, result.cancelled, store.list_work_orders()[1][0]["state"]
(1, 1, 'cancelled')

**Transactional outbox.** Notifications, feedback and dead letters are rows of ``outbox``
written in the same transaction as the change that caused them, under a unique
``dedupe_key``; :mod:`remediation.notify` sends them and marks them sent. So a crash loses
none of them, and a replay queues none twice. With ``influx`` on, incident and work-order
life-cycle events (opened, escalated, assigned, resolved, false_alarm, cancelled, reopened) are
queued the same way as ``mw_incident`` lines (channel ``influx``, sent by
:mod:`remediation.influx`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from meshwatch.contract import topics
from meshwatch.contract.codec import encode
from meshwatch.contract.events import (
    MAX_TS_MS,
    MIN_TS_MS,
    Alert,
    DeadLetter,
    Feedback,
    Outcome,
    WorkOrderEvent,
    WorkOrderState,
)
from meshwatch.registry import Registry
from remediation import correlate, workorders
from remediation.assign import Crew, choose_crew
from remediation.db import (
    AlertRow,
    Base,
    IncidentRow,
    OutboxRow,
    TransitionRow,
    WorkOrderRow,
    bulk_insert,
    is_postgres,
    lock_key,
    reader,
)
from remediation.workorders import ACTIVE, FINAL, Role, TransitionError

log = logging.getLogger(__name__)

SYSTEM = "system"
MAX_ALERT_IDS = 200
"""At most this many alert ids go into one event (newest first)."""
RETRIES = 8
DISPATCHABLE = frozenset({"open", "assigned"})
"""Work-order states in which no crew has acknowledged yet: a clear cancels them."""
REOPENABLE = frozenset({"false_alarm", "cancelled"})
"""Final work-order states that new evidence reopens (``resolved`` is final for good)."""
LOCK_DISTRICTS = text("SELECT count(pg_advisory_xact_lock(k)) "
                      "FROM unnest(CAST(:keys AS bigint[])) AS k")
"""PostgreSQL: take the advisory locks of a batch's districts, in the order given."""


def derived_id(prefix: str, alert_id: str) -> str:
    """A deterministic id from the alert that opened an incident.

    >>> derived_id("wo", "a-1") == derived_id("wo", "a-1"), derived_id("inc", "a-1")[:4]
    (True, 'inc-')
    """
    return f"{prefix}-{hashlib.sha256(alert_id.encode()).hexdigest()[:24]}"


def now_ms() -> int:
    """Wall-clock time in epoch ms (SLAs and audit use wall time, detectors event time)."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Incoming:
    """One message from the alert topic: a valid alert, or a dead letter to record."""

    alert: Alert | None = None
    district: str | None = None  # from the topic when the alert has none
    dead_letter: DeadLetter | None = None


@dataclass
class IngestResult:
    """What one :meth:`Store.ingest` call did."""

    stored: int = 0
    duplicates: int = 0
    incidents: int = 0
    joined: int = 0
    escalated: int = 0
    dead_letters: int = 0
    cleared: int = 0
    """Incidents whose every alert has now cleared."""
    cancelled: int = 0
    """Of those, work orders cancelled because no crew had acknowledged them yet."""
    work_orders: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """What the store needs from ``[remediation]``."""

    window_ms: int = 6 * 3600 * 1000
    sla_ack_s: tuple[float, ...] = (900.0, 3600.0, 14400.0, 86400.0)
    sla_resolve_s: tuple[float, ...] = (14400.0, 86400.0, 259200.0, 604800.0)
    webhook: bool = False
    client_id: str = "mw-remediation"
    influx: bool = False
    """Queue ``mw_incident`` lines (``[influxdb] url`` set)."""


class NotFoundError(LookupError):
    """No such work order, or not one the caller may see."""


class Store:
    """All reads and writes of the remediation database.

    Args:
        engine: from :func:`remediation.db.make_engine`, schema upgraded.
        settings: window, SLA, whether webhooks are on.
        crews: the crews assignment chooses from.
        registry: for customer criticality (may be empty).
        clock: wall clock in epoch ms (tests pass their own).

    """

    def __init__(self, engine: Engine, settings: Settings | None = None,
                 crews: Sequence[Crew] = (), registry: Registry | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.engine = engine
        self.reader = reader(engine)
        self.settings = settings or Settings()
        self.crews = list(crews)
        self.registry = registry or Registry([])
        self.clock = clock
        self._point_lock = threading.Lock()
        self._last_point_ms = 0

    # -- transactions ---------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction, committed at the end (rolled back on error)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session
            _write_rows(session)

    def _retrying(self, work: Callable[[Session], Any]) -> Any:
        delay = 0.01
        for attempt in range(RETRIES):
            try:
                with self.session() as session:
                    return work(session)
            except DBAPIError as exc:
                if not _transient(exc) or attempt == RETRIES - 1:
                    raise
                log.info("retrying a transaction after %s", type(exc.orig).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    # -- intake ---------------------------------------------------------------------------

    def ingest(self, items: Sequence[Incoming]) -> IngestResult:
        """Store a batch of alerts and dead letters in one transaction; see the module doc."""
        return self._retrying(lambda session: self._ingest(session, items))  # type: ignore[no-any-return]

    def _ingest(self, session: Session, items: Sequence[Incoming]) -> IngestResult:
        result = IngestResult()
        now = self.clock()
        alerts = [(item.alert, item.alert.district or item.district)
                  for item in items if item.alert is not None]
        districts = sorted({str(d) for _, d in alerts})
        if is_postgres(self.engine) and districts:
            # One round trip; unnest yields the keys in array order (districts sorted).
            session.execute(LOCK_DISTRICTS, {"keys": [lock_key(f"district:{d}")
                                                      for d in districts]})
        for item in items:
            if item.dead_letter is not None:
                result.dead_letters += self._dead_letter(session, item.dead_letter, now)
        if not alerts:
            return result
        ids = [a.alert_id for a, _ in alerts]
        known = {row.alert_id: row for row in session.scalars(
            select(AlertRow).where(AlertRow.alert_id.in_(ids)))}
        since = min(a.first_ts_ms for a, _ in alerts)
        # Districts where an alert may join any incident (district-wide alerts, anomalies);
        # elsewhere only incidents of the alerts' devices and district-wide ones qualify.
        wide = {str(d) for a, d in alerts if a.device_id is None or a.kind.value == "anomaly"}
        devices = {a.device_id for a, _ in alerts if a.device_id is not None}
        batch = _Batch(self, session, districts, now, since, wide, devices)
        for alert, maybe_district in alerts:
            district = str(maybe_district)  # the topic always has one
            row = known.get(alert.alert_id)
            if row is None:
                row = batch.new_alert(alert, district, result)
                known[alert.alert_id] = row
                result.stored += 1
            elif _newer(alert, row):
                batch.update_alert(row, alert, result)
                result.stored += 1
            else:
                result.duplicates += 1
        batch.settle_clears(result)
        return result

    def _dead_letter(self, session: Session, letter: DeadLetter, now: int) -> int:
        digest = hashlib.sha256(
            f"{letter.source_topic}\0{letter.payload_b64}".encode()).hexdigest()[:32]
        return self._queue(session, f"deadletter:{digest}", "mqtt",
                           topics.dead_letter(letter.reason), encode(letter), now)

    def _queue(self, session: Session, key: str, channel: str, topic: str | None,
               payload: bytes, now: int, *, check: bool = True) -> int:
        """Add an outbox row unless its key is queued already; returns 1 if added.

        ``check=False`` skips the look-up where the key is new by construction (it names an
        alert stored in this very transaction); the unique key still guards it.
        """
        rows, keys = _rows_of(session, OutboxRow)
        if key in keys or (check and session.scalar(
                select(OutboxRow.id).where(OutboxRow.dedupe_key == key)) is not None):
            return 0
        keys.add(key)
        rows.append({"dedupe_key": key, "channel": channel, "topic": topic, "payload": payload,
                     "created_ms": now, "attempts": 0, "next_attempt_ms": now})
        return 1

    def notify(self, session: Session, wo: WorkOrderRow, event: str, cause: str, actor: str,
               now: int, note: str | None = None, alert_ids: list[str] | None = None,
               check: bool = True) -> None:
        """Queue a work-order event for its crew's topic (if any) and the webhook (if on)."""
        if wo.crew_id is None and not self.settings.webhook:
            return  # nobody to tell (a new work order before its assignment, webhook off)
        if alert_ids is None:
            alert_ids = self._alert_ids(session, wo.incident_id)
        message = WorkOrderEvent(
            work_order_id=wo.work_order_id, incident_id=wo.incident_id, event=event,
            state=WorkOrderState(wo.state), priority=wo.priority, ts_ms=_clamp_ms(now),
            actor=actor[:2000], crew_id=wo.crew_id, district=wo.district,
            device_id=wo.device_id, alert_ids=alert_ids[:MAX_ALERT_IDS],
            note=None if note is None else note[:2000])
        payload = encode(message)
        if wo.crew_id is not None:
            self._queue(session, f"mqtt:{wo.work_order_id}:{event}:{cause}", "mqtt",
                        topics.crew_work_orders(wo.crew_id), payload, now, check=check)
        if self.settings.webhook:
            self._queue(session, f"webhook:{wo.work_order_id}:{event}:{cause}", "webhook",
                        None, payload, now, check=check)

    def point_ms(self, now: int) -> int:
        """A timestamp for an ``mw_incident`` point: ``now``, or 1 ms after the last one.

        Points with equal tags and timestamp overwrite each other in InfluxDB; events of one
        batch share ``now``, so each gets its own millisecond (unique within this process).
        """
        with self._point_lock:
            self._last_point_ms = max(now, self._last_point_ms + 1)
            return self._last_point_ms

    def record(self, session: Session, wo: WorkOrderRow, incident: IncidentRow | None,
               event: str, now: int, text: str) -> None:
        """Queue an ``mw_incident`` line for InfluxDB (when on), in this transaction."""
        if not self.settings.influx:
            return
        from remediation.influx import CHANNEL, incident_line  # influx imports this module

        incident = incident or session.get(IncidentRow, wo.incident_id)
        assert incident is not None
        ts = self.point_ms(now)
        summary = f"{event}: {incident.kind} {incident.severity} in {incident.district}"
        if incident.device_id:
            summary += f" at {incident.device_id}"
        summary += f", priority {wo.priority}"
        if wo.crew_id:
            summary += f", crew {wo.crew_id}"
        if text:
            summary += f" — {text}"
        line = incident_line(event, incident, wo, summary, ts)
        self._queue(session, f"influx:{wo.work_order_id}:{event}:{ts}", CHANNEL, None,
                    line.encode(), now, check=False)

    def _alert_ids(self, session: Session, incident_id: str) -> list[str]:
        """Newest first, stored or created in this transaction."""
        rows = [(-ts, alert_id) for alert_id, ts in session.execute(
            select(AlertRow.alert_id, AlertRow.last_ts_ms)
            .where(AlertRow.incident_id == incident_id)
            .order_by(AlertRow.last_ts_ms.desc(), AlertRow.alert_id).limit(MAX_ALERT_IDS))]
        rows += [(-row.last_ts_ms, row.alert_id) for row in _created(session, AlertRow)
                 if row.incident_id == incident_id]
        return [alert_id for _, alert_id in sorted(set(rows))[:MAX_ALERT_IDS]]

    def workload(self, session: Session) -> Counter[str]:
        """Active work orders per crew."""
        rows = session.execute(
            select(WorkOrderRow.crew_id, func.count()).where(
                WorkOrderRow.state.in_(ACTIVE), WorkOrderRow.crew_id.is_not(None))
            .group_by(WorkOrderRow.crew_id))
        return Counter({str(crew): int(n) for crew, n in rows})

    def critical(self, device_id: str | None) -> bool:
        """Whether the device serves a critical customer (registry)."""
        return device_id is not None and device_id in self.registry and \
            self.registry[device_id].critical

    # -- life cycle ----------------------------------------------------------------------

    def transition(self, work_order_id: str, to: str, *, actor: str, role: Role,
                   crew_scope: str | None = None, outcome: str | None = None,
                   note: str | None = None, crew_id: str | None = None) -> dict[str, Any]:
        """Move a work order to ``to``, audited.

        Raises :class:`TransitionError`, or :class:`NotFoundError` (also when ``crew_scope`` is
        set and the work order is another crew's).

        ``crew_id`` names the crew when going to ``assigned`` (operator or system).
        """

        def work(session: Session) -> dict[str, Any]:
            wo = session.scalar(select(WorkOrderRow).where(
                WorkOrderRow.work_order_id == work_order_id).with_for_update())
            if wo is None or (crew_scope is not None and wo.crew_id != crew_scope):
                raise NotFoundError(work_order_id)
            out = outcome
            if to == "false_alarm" and out is None:
                out = "false_alarm"
            workorders.check_transition(wo.state, to, role=role, outcome=out)
            if to == "assigned" and crew_id not in {c.crew_id for c in self.crews}:
                known = ", ".join(c.crew_id for c in self.crews) or "none configured"
                msg = f"assigning needs a known crew_id; crews: {known}"
                raise TransitionError(msg)
            self.apply(session, wo, to, actor=actor, reason=note, outcome=out, crew_id=crew_id,
                       now=self.clock())
            return work_order_dict(wo)

        return self._retrying(work)  # type: ignore[no-any-return]

    def apply(self, session: Session, wo: WorkOrderRow, to: str, *, actor: str,
              reason: str | None, now: int, outcome: str | None = None,
              crew_id: str | None = None, event: str = "transition",
              incident: IncidentRow | None = None, cause: str | None = None,
              alert_ids: list[str] | None = None) -> None:
        """Apply an already checked transition: timestamps, audit, incident, outbox.

        The intake passes ``incident``, ``cause`` (the alert) and ``alert_ids`` so that no
        query runs per alert; otherwise they are looked up.
        """
        frm = wo.state
        wo.state = to
        if to == "assigned":
            wo.crew_id = crew_id
            wo.assigned_ms = now
            event = "assigned"
        elif to == "open":
            wo.crew_id = None if frm == "assigned" else wo.crew_id
            wo.outcome = None
            wo.closed_ms = None
        elif to == "acknowledged":
            wo.acknowledged_ms = now
        elif to == "in_progress":
            wo.started_ms = now
        elif to in FINAL:
            wo.closed_ms = now
            wo.outcome = outcome
            if reason:
                wo.note = reason[:2000]
        _audit(session, dict(work_order_id=wo.work_order_id, event=event, from_state=frm,
                                  to_state=to, actor=actor[:128], ts_ms=now, reason=reason))
        incident = incident or session.get(IncidentRow, wo.incident_id)
        assert incident is not None
        if to in FINAL:
            incident.state = "closed"
        elif frm in FINAL:
            incident.state = "open"
        incident.updated_ms = now
        if event == "assigned":
            if cause is None:
                cause = "t" + str(session.scalar(select(func.count()).select_from(
                    TransitionRow).where(TransitionRow.work_order_id == wo.work_order_id)))
            self.notify(session, wo, "assigned", cause, actor, now, note=reason,
                        alert_ids=alert_ids, check=alert_ids is None)
        happened = to if to in FINAL else "reopened" if frm in FINAL else \
            "assigned" if event == "assigned" else None
        if happened is not None:
            self.record(session, wo, incident, happened, now,
                        f"{reason or ''} (by {actor})".strip())
        if to in {"resolved", "false_alarm"}:
            wo.closures += 1
            self._feedback(session, wo, incident, now)

    def _feedback(self, session: Session, wo: WorkOrderRow, incident: IncidentRow,
                  now: int) -> None:
        alert_ids = self._alert_ids(session, incident.incident_id)
        feedback = Feedback(work_order_id=wo.work_order_id, alert_ids=alert_ids or ["none"],
                            outcome=Outcome(wo.outcome or "other"), ts_ms=_clamp_ms(now),
                            device_id=incident.device_id, district=incident.district,
                            note=wo.note)
        self._queue(session, f"feedback:{wo.work_order_id}:{wo.closures}", "mqtt",
                    topics.build("feedback", district=incident.district), encode(feedback), now)

    def auto_assign(self, session: Session, wo: WorkOrderRow, workload: Counter[str],
                    now: int, cause: str, incident: IncidentRow | None = None,
                    alert_ids: list[str] | None = None) -> None:
        """Assign an open work order to the best crew, if any qualifies."""
        crew = choose_crew(self.crews, wo.district, wo.skill, workload)
        if crew is None:
            return
        self.apply(session, wo, "assigned", actor=SYSTEM, reason=f"auto-assigned ({cause})",
                   crew_id=crew, now=now, incident=incident,
                   cause=None if alert_ids is None else cause.replace(" ", "-"),
                   alert_ids=alert_ids)
        workload[crew] += 1

    # -- SLA -----------------------------------------------------------------------------

    def check_sla(self) -> int:
        """Escalate every active work order past a deadline; returns how many escalated."""

        def work(session: Session) -> int:
            now = self.clock()
            rows = session.scalars(select(WorkOrderRow).where(
                WorkOrderRow.state.in_(ACTIVE),
                or_(and_(WorkOrderRow.ack_due_ms <= now, WorkOrderRow.escalation_level < 1,
                         WorkOrderRow.state.in_(("open", "assigned"))),
                    and_(WorkOrderRow.resolve_due_ms <= now,
                         WorkOrderRow.escalation_level < 2))).with_for_update())
            escalated = 0
            for wo in rows:
                level = workorders.sla_breach(wo.state, now, wo.ack_due_ms, wo.resolve_due_ms,
                                              wo.escalation_level)
                if level is None:
                    continue
                wo.escalation_level = level
                why = ("not acknowledged by its SLA deadline" if level == 1
                       else "not resolved by its SLA deadline")
                _audit(session, dict(work_order_id=wo.work_order_id, event="escalated",
                                          from_state=wo.state, to_state=wo.state, actor=SYSTEM,
                                          ts_ms=now, reason=f"SLA: {why}"))
                self.notify(session, wo, "escalated", f"sla{level}", SYSTEM, now,
                            note=f"SLA: {why}")
                self.record(session, wo, None, "escalated", now, f"SLA: {why}")
                escalated += 1
            return escalated

        return self._retrying(work)  # type: ignore[no-any-return]

    # -- reads ---------------------------------------------------------------------------

    def list_work_orders(self, *, crew_scope: str | None = None, state: str | None = None,
                         priority: int | None = None, district: str | None = None,
                         crew_id: str | None = None, limit: int = 50, offset: int = 0,
                         ) -> tuple[int, list[dict[str, Any]]]:
        """(total, page) of work orders, most urgent first, filtered."""
        query = select(WorkOrderRow)
        if crew_scope is not None:
            query = query.where(WorkOrderRow.crew_id == crew_scope)
        for column, value in ((WorkOrderRow.state, state), (WorkOrderRow.priority, priority),
                              (WorkOrderRow.district, district),
                              (WorkOrderRow.crew_id, crew_id)):
            if value is not None:
                query = query.where(column == value)
        with Session(self.reader) as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(
                WorkOrderRow.priority, WorkOrderRow.created_ms, WorkOrderRow.work_order_id)
                .limit(limit).offset(offset))
            return int(total), [work_order_dict(wo) for wo in rows]

    def work_order(self, work_order_id: str, *, crew_scope: str | None = None,
                   ) -> dict[str, Any]:
        """One work order with its incident, alerts (with evidence) and audit trail."""
        with Session(self.reader) as session:
            wo = session.get(WorkOrderRow, work_order_id)
            if wo is None or (crew_scope is not None and wo.crew_id != crew_scope):
                raise NotFoundError(work_order_id)
            incident = session.get(IncidentRow, wo.incident_id)
            assert incident is not None
            alerts = session.scalars(select(AlertRow).where(
                AlertRow.incident_id == wo.incident_id).order_by(AlertRow.first_ts_ms)
                .limit(MAX_ALERT_IDS))
            audit = session.scalars(select(TransitionRow).where(
                TransitionRow.work_order_id == work_order_id).order_by(TransitionRow.id))
            data = work_order_dict(wo)
            data["incident"] = _row_dict(incident)
            data["alerts"] = [_row_dict(a) for a in alerts]
            data["audit"] = [_row_dict(t) for t in audit]
            data["allowed"] = workorders.allowed_from(wo.state)
            return data

    def incidents(self, *, state: str | None = "open", limit: int = 50, offset: int = 0,
                  ) -> tuple[int, list[dict[str, Any]]]:
        """(total, page) of incidents with their work order's id, state and crew."""
        query = select(IncidentRow, WorkOrderRow).join(
            WorkOrderRow, WorkOrderRow.incident_id == IncidentRow.incident_id)
        if state is not None:
            query = query.where(IncidentRow.state == state)
        with Session(self.reader) as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.order_by(WorkOrderRow.priority,
                                                  IncidentRow.created_ms.desc()).limit(limit)
                                   .offset(offset))
            page = []
            for incident, wo in rows:
                item = _row_dict(incident)
                item.update(work_order_id=wo.work_order_id, work_order_state=wo.state,
                            crew_id=wo.crew_id, priority=wo.priority)
                page.append(item)
            return int(total), page

    # -- outbox --------------------------------------------------------------------------

    def pending(self, channel: str, limit: int = 500) -> list[OutboxRow]:
        """Unsent outbox rows of ``channel`` due now, oldest first."""
        with Session(self.reader, expire_on_commit=False) as session:
            return list(session.scalars(select(OutboxRow).where(
                OutboxRow.sent_ms.is_(None), OutboxRow.channel == channel,
                OutboxRow.next_attempt_ms <= self.clock()).order_by(OutboxRow.id).limit(limit)))

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Record that these outbox rows were delivered."""
        if ids:
            with self.session() as session:
                session.execute(update(OutboxRow).where(OutboxRow.id.in_(list(ids)))
                                .values(sent_ms=self.clock()))

    def mark_failed(self, row_id: int, error: str, retry_at_ms: int | None) -> None:
        """Record a failed attempt; ``retry_at_ms`` None gives up (sent_ms = -1)."""
        with self.session() as session:
            values: dict[str, Any] = {"attempts": OutboxRow.attempts + 1,
                                      "last_error": error[:2000]}
            if retry_at_ms is None:
                values["sent_ms"] = -1
            else:
                values["next_attempt_ms"] = retry_at_ms
            session.execute(update(OutboxRow).where(OutboxRow.id == row_id).values(**values))


class _Batch:
    """Correlation state of one ingest transaction: candidates per district, workloads."""

    def __init__(self, store: Store, session: Session, districts: list[str], now: int,
                 since_ms: int, wide: set[str], devices: set[str]) -> None:
        self.store = store
        self.session = session
        self.now = now
        self.window = store.settings.window_ms
        self.workload = store.workload(session) if store.crews else Counter()
        # Candidates as plain tuples (cheap to load); ORM rows only for incidents joined.
        self.candidates: dict[str, dict[str, correlate.Candidate]] = {d: {} for d in districts}
        self.orders: dict[str, WorkOrderRow] = {}
        self.incidents: dict[str, IncidentRow] = {}
        self.cleared: dict[str, tuple[str, int]] = {}
        """Incidents with an alert cleared in this batch -> (alert id, its last_ts_ms)."""
        i, w = IncidentRow, WorkOrderRow
        rows = session.execute(
            select(i.incident_id, i.district, i.device_id, i.kind, i.severity, i.est_loss_lph,
                   i.first_ts_ms, i.last_ts_ms, w.state)
            .join(w, w.incident_id == i.incident_id)
            .where(i.district.in_(districts), i.last_ts_ms >= since_ms - self.window,
                   or_(i.state == "open", w.state.in_(REOPENABLE)),
                   or_(i.district.in_(wide), i.device_id.is_(None),
                       i.device_id.in_(devices))))
        for iid, district, device, kind, severity, loss, first, last, state in rows:
            candidate = correlate.Candidate(iid, district, device, kind, severity, loss, first,
                                            last, closed=state in FINAL)
            self.candidates[candidate.district][candidate.incident_id] = candidate

    def _rows(self, incident_id: str) -> tuple[IncidentRow, WorkOrderRow]:
        incident = self.incidents.get(incident_id) or self.session.get(IncidentRow, incident_id)
        wo = self.orders.get(incident_id) or self.session.scalar(
            select(WorkOrderRow).where(WorkOrderRow.incident_id == incident_id))
        assert incident is not None
        assert wo is not None
        self.incidents[incident_id], self.orders[incident_id] = incident, wo
        return incident, wo

    def _remember(self, incident: IncidentRow, wo: WorkOrderRow) -> None:
        self.candidates.setdefault(incident.district, {})[incident.incident_id] = _candidate(
            incident, closed=wo.state in FINAL)

    def new_alert(self, alert: Alert, district: str, result: IngestResult) -> AlertRow:
        row = AlertRow(alert_id=alert.alert_id, district=district, device_id=alert.device_id,
                       kind=alert.kind.value, severity=alert.severity.value,
                       status=alert.status.value, score=alert.score,
                       est_loss_lph=alert.est_loss_lph, first_ts_ms=alert.first_ts_ms,
                       last_ts_ms=alert.last_ts_ms, model_version=alert.model_version,
                       evidence=dict(alert.evidence), received_ms=self.now)
        if alert.status.value == "cleared":
            _create(self.session, row)  # a clear we never saw open: recorded, nothing to do
            return row
        self._correlate(row, alert, result)  # adds the row once its incident exists
        return row

    def update_alert(self, row: AlertRow, alert: Alert, result: IngestResult) -> None:
        before = correlate.Subject(row.district, row.device_id, row.kind, row.severity,
                                   row.est_loss_lph, row.first_ts_ms, row.last_ts_ms)
        was_cleared = row.status == "cleared"
        row.status = alert.status.value
        row.severity = correlate.merged_severity(row.severity, alert.severity.value)
        row.score = alert.score
        row.est_loss_lph = alert.est_loss_lph if alert.est_loss_lph is not None else \
            row.est_loss_lph
        row.last_ts_ms = alert.last_ts_ms
        row.evidence = dict(alert.evidence) or row.evidence
        if row.incident_id is None and alert.status.value != "cleared":
            self._correlate(row, alert, result)
        if row.incident_id is None:
            return
        incident = self.store_incident(row.incident_id)
        if incident is None:
            return
        if alert.status.value == "cleared":
            self.cleared[incident.incident_id] = (row.alert_id, alert.last_ts_ms)
            return
        subject = _subject(alert, row.district)
        if incident.state == "closed":
            _, wo = self._rows(incident.incident_id)
            if was_cleared and wo.state in REOPENABLE:  # the condition is back
                self._join(incident, row, subject, escalate=False, reopen=True, result=result,
                           rule="cleared alert active again", count=False)
            else:  # after the work order ended: recorded, nothing more
                log.info("alert %s updated after its work order closed", row.alert_id)
            return
        incident.cleared_ms = None
        if correlate.escalates(subject, _candidate(incident, closed=False)) or \
                subject.severity != before.severity:
            self._join(incident, row, subject, escalate=correlate.escalates(
                subject, _candidate(incident, closed=False)), reopen=False, result=result,
                rule="new evidence", count=False)
        else:
            incident.last_ts_ms = max(incident.last_ts_ms, alert.last_ts_ms)

    def settle_clears(self, result: IngestResult) -> None:
        """Apply the clear rule (module doc) to incidents that had an alert cleared."""
        if not self.cleared:
            return
        self.session.flush()
        active = set(self.session.scalars(
            select(AlertRow.incident_id).where(AlertRow.incident_id.in_(list(self.cleared)),
                                               AlertRow.status != "cleared").distinct()))
        active |= {row.incident_id for row in _created(self.session, AlertRow)
                   if row.status != "cleared"}
        for incident_id, (alert_id, ts) in sorted(self.cleared.items()):
            incident, wo = self._rows(incident_id)
            if incident_id in active or incident.cleared_ms is not None:
                continue
            incident.cleared_ms = self.now
            result.cleared += 1
            cleared = (f"all {incident.alert_count} alerts cleared (last {alert_id})"
                       if incident.alert_count > 1 else f"alert {alert_id} cleared")
            if wo.state in DISPATCHABLE:
                why = f"condition cleared before dispatch: {cleared}"
                self.store.apply(self.session, wo, "cancelled", actor=SYSTEM, reason=why,
                                 now=self.now, incident=incident)
                self.store.notify(self.session, wo, "transition", f"clear-{alert_id}-{ts}",
                                  SYSTEM, self.now, note=why)
                result.cancelled += 1
            elif wo.state not in FINAL:
                _audit(self.session, dict(
                    work_order_id=wo.work_order_id, event="cleared", from_state=wo.state,
                    to_state=wo.state, actor=SYSTEM, ts_ms=self.now,
                    reason=f"condition cleared after dispatch: {cleared}; left to the crew"))

    def store_incident(self, incident_id: str) -> IncidentRow | None:
        return self.incidents.get(incident_id) or self.session.get(IncidentRow, incident_id)

    def _correlate(self, row: AlertRow, alert: Alert, result: IngestResult) -> None:
        subject = _subject(alert, row.district)
        candidates: Iterable[correlate.Candidate] = self.candidates.setdefault(
            row.district, {}).values()
        if subject.device_id is not None and subject.kind != "anomaly":  # rules 1 and 2 only
            candidates = [c for c in candidates
                          if c.device_id is None or c.device_id == subject.device_id]
        decision = correlate.decide(subject, candidates, self.window)
        if decision.incident_id is None:
            self._open(row, subject, result)
            return
        incident, _ = self._rows(decision.incident_id)
        if decision.rule == "anomalies become district-wide":
            incident.device_id = None
        self._join(incident, row, subject, escalate=decision.escalate, reopen=decision.reopen,
                   result=result, rule=decision.rule)

    def _open(self, row: AlertRow, subject: correlate.Subject, result: IngestResult) -> None:
        now = self.now
        incident_id = correlate_id = derived_id("inc", row.alert_id)
        critical = self.store.critical(subject.device_id)
        incident = IncidentRow(
            incident_id=incident_id, district=subject.district, device_id=subject.device_id,
            kind=subject.kind, severity=subject.severity, est_loss_lph=subject.est_loss_lph,
            critical_customer=critical, first_ts_ms=subject.first_ts_ms,
            last_ts_ms=subject.last_ts_ms, alert_count=1, state="open", created_ms=now,
            updated_ms=now)
        _create(self.session, incident)
        row.incident_id = correlate_id
        _create(self.session, row)
        prio = workorders.priority(subject.severity, est_loss_lph=subject.est_loss_lph,
                                   critical_customer=critical)
        s = self.store.settings
        ack_due, resolve_due = workorders.deadlines(now, prio, list(s.sla_ack_s),
                                                    list(s.sla_resolve_s))
        wo = WorkOrderRow(
            work_order_id=derived_id("wo", row.alert_id), incident_id=incident_id, state="open",
            priority=prio, crew_id=None, skill=correlate.family(subject.kind),
            district=subject.district, device_id=subject.device_id, created_ms=now,
            ack_due_ms=ack_due, resolve_due_ms=resolve_due, escalation_level=0, closures=0)
        _create(self.session, wo)
        _audit(self.session, dict(work_order_id=wo.work_order_id, event="created",
                                       from_state=None, to_state="open", actor=SYSTEM,
                                       ts_ms=now, reason=f"alert {row.alert_id}"))
        self.store.notify(self.session, wo, "created", row.alert_id, SYSTEM, now,
                          alert_ids=[row.alert_id], check=False)
        self.store.record(self.session, wo, incident, "opened", now, f"alert {row.alert_id}")
        self.store.auto_assign(self.session, wo, self.workload, now, f"alert {row.alert_id}",
                               incident=incident, alert_ids=[row.alert_id])
        self.incidents[incident_id], self.orders[incident_id] = incident, wo
        self._remember(incident, wo)
        result.incidents += 1
        result.work_orders.append(wo.work_order_id)

    def _join(self, incident: IncidentRow, row: AlertRow, subject: correlate.Subject, *,
              escalate: bool, reopen: bool, result: IngestResult, rule: str,
              count: bool = True) -> None:
        now = self.now
        row.incident_id = incident.incident_id
        _create(self.session, row)
        incident.cleared_ms = None
        if count:
            incident.alert_count += 1
            result.joined += 1
        incident.kind = correlate.merged_kind(incident.kind, subject.kind)
        incident.severity = correlate.merged_severity(incident.severity, subject.severity)
        if subject.est_loss_lph is not None:
            incident.est_loss_lph = max(incident.est_loss_lph or 0.0, subject.est_loss_lph)
        incident.critical_customer = incident.critical_customer or self.store.critical(
            subject.device_id)
        incident.first_ts_ms = min(incident.first_ts_ms, subject.first_ts_ms)
        incident.last_ts_ms = max(incident.last_ts_ms, subject.last_ts_ms)
        incident.updated_ms = now
        _, wo = self._rows(incident.incident_id)
        wo.device_id = incident.device_id
        wo.skill = correlate.family(incident.kind)
        if reopen and wo.state in FINAL:
            self.store.apply(self.session, wo, "open", actor=SYSTEM, now=now,
                             reason=f"reopened by new evidence: alert {row.alert_id}",
                             event="reopened", incident=incident)
            self.store.auto_assign(self.session, wo, self.workload, now,
                                   f"reopened by alert {row.alert_id}", incident=incident)
        if escalate:
            prio = workorders.priority(incident.severity, est_loss_lph=incident.est_loss_lph,
                                       critical_customer=incident.critical_customer)
            why = (f"alert {row.alert_id} ({rule}): {subject.kind} {subject.severity}"
                   + (f", {subject.est_loss_lph:g} L/h" if subject.est_loss_lph else ""))
            if prio < wo.priority:
                why += f"; priority {wo.priority} → {prio}"
                wo.priority = prio
                s = self.store.settings
                wo.ack_due_ms, wo.resolve_due_ms = workorders.deadlines(
                    wo.created_ms, prio, list(s.sla_ack_s), list(s.sla_resolve_s))
            _audit(self.session, dict(work_order_id=wo.work_order_id, event="escalated",
                                           from_state=wo.state, to_state=wo.state, actor=SYSTEM,
                                           ts_ms=now, reason=why))
            self.store.notify(self.session, wo, "escalated", row.alert_id, SYSTEM, now,
                              note=why)
            self.store.record(self.session, wo, incident, "escalated", now, why)
            result.escalated += 1
        self._remember(incident, wo)


def _rows_of(session: Session, table: type) -> tuple[list[dict[str, Any]], set[str]]:
    """Rows of ``table`` to insert at commit (Core, in bulk), and their outbox keys."""
    pending = session.info.setdefault("mw_rows", {})
    if table not in pending:
        pending[table] = ([], set())
    return pending[table]  # type: ignore[no-any-return]


def _create(session: Session, row: AlertRow | IncidentRow | WorkOrderRow) -> None:
    """Insert this new row at commit, in bulk with the batch's others, not by the ORM's flush.

    Rows of an ingest are created and changed in memory (an incident opened by one alert is
    joined by the next); their INSERTs (``COPY`` on PostgreSQL) are far cheaper than the
    unit of work's. Such rows stay out of the session: look them up in the batch, not with
    ``session.get``. A row that was loaded (an alert stored earlier) is left to the flush.
    """
    if not instance_state(row).transient:
        return
    created: dict[int, Any] = session.info.setdefault("mw_created", {})
    created.setdefault(id(row), row)


def _created(session: Session, table: type) -> list[Any]:
    """Rows of ``table`` created in this transaction and not inserted yet."""
    return [row for row in session.info.get("mw_created", {}).values()
            if isinstance(row, table)]


def _audit(session: Session, row: dict[str, Any]) -> None:
    """Queue an audit row (``transitions`` columns); written in bulk at commit, never changed."""
    row.setdefault("reason", None)
    _rows_of(session, TransitionRow)[0].append(row)


def _write_rows(session: Session) -> None:
    """Insert the rows created in this transaction, audit and outbox rows, in bulk.

    Changes to rows that were loaded go through the ORM's flush; new rows go in with
    :func:`remediation.db.bulk_insert` (foreign keys are checked at commit).
    """
    session.flush()
    created = list(session.info.pop("mw_created", {}).values())
    for kind in (IncidentRow, WorkOrderRow, AlertRow):
        table = Base.metadata.tables[kind.__tablename__]
        bulk_insert(session.connection(), table,
                    [{column.key: getattr(row, column.key) for column in table.columns}
                     for row in created if isinstance(row, kind)])
    for table, (rows, keys) in session.info.pop("mw_rows", {}).items():
        bulk_insert(session.connection(), table.__table__, rows)
        keys.clear()


def _subject(alert: Alert, district: str) -> correlate.Subject:
    return correlate.Subject(district, alert.device_id, alert.kind.value, alert.severity.value,
                             alert.est_loss_lph, alert.first_ts_ms, alert.last_ts_ms)


def _candidate(incident: IncidentRow, *, closed: bool) -> correlate.Candidate:
    return correlate.Candidate(incident.incident_id, incident.district, incident.device_id,
                               incident.kind, incident.severity, incident.est_loss_lph,
                               incident.first_ts_ms, incident.last_ts_ms, closed)


def _newer(alert: Alert, row: AlertRow) -> bool:
    """Whether ``alert`` brings something ``row`` does not have (a redelivery does not)."""
    if alert.last_ts_ms != row.last_ts_ms:
        return alert.last_ts_ms > row.last_ts_ms
    return (alert.status.value != row.status and alert.status.value == "cleared") or \
        correlate.SEVERITY_RANK[alert.severity.value] > correlate.SEVERITY_RANK[row.severity]


def _transient(exc: DBAPIError) -> bool:
    """Serialization failures, deadlocks and lock time-outs: worth a retry."""
    code = getattr(exc.orig, "sqlstate", None)
    message = str(exc.orig)
    return code in {"40001", "40P01", "55P03", "23505"} or "locked" in message or \
        "UNIQUE constraint failed" in message


def _clamp_ms(ms: int) -> int:
    return max(MIN_TS_MS, min(MAX_TS_MS - 1, ms))


def _row_dict(row: Any) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in row.__table__.columns}


def work_order_dict(wo: WorkOrderRow) -> dict[str, Any]:
    """A work order as plain data (the API's item)."""
    return _row_dict(wo)


def dead_letter_for(payload: bytes, *, reason: str, detail: str, topic: str,
                    client_id: str, received_ms: int) -> DeadLetter:
    """The dead letter of a message that could not be accepted.

    >>> dl = dead_letter_for(b"{", reason="malformed_json", detail="bad", topic="t",
    ...                      client_id="c", received_ms=1767225600000)
    >>> dl.reason, dl.payload_b64
    ('malformed_json', 'ew==')
    """
    return DeadLetter(reason=reason, detail=detail[:2000],
                      payload_b64=base64.b64encode(payload).decode(),
                      received_ms=_clamp_ms(received_ms), source_topic=topic[:2000],
                      client_id=client_id)
