"""The mediator: which incident an alert belongs to. Pure: no I/O, no clock.

Rules, in order (``window`` is event time, around the incident's ``[first, last]`` span):

1. An alert joins an incident of the **same device** of a compatible kind.
2. Any alert joins a **district-wide** incident (no device) of the same district and a
   compatible kind: a burst in district D absorbs the customer anomalies D sees meanwhile.
3. A district-wide alert joins the district's open **anomaly** incident of a device, which
   thereby becomes district-wide (the anomalies were the first symptoms of the burst).
4. A device **anomaly** alert joins another hydraulic incident in its district: a cluster of
   customer anomalies is one thing to investigate, not one truck per house.
5. Otherwise it opens a new incident.

Kinds are compatible inside one family: *hydraulic* (``leak``, ``burst``, ``anomaly``) or
*device* (``sensor_fault``, ``silent``). Candidates are open incidents, and closed ones whose
work order was a false alarm or cancelled (new evidence reopens them). A new alert that is more
severe than its incident, or reports at least 50 % more loss, escalates it.

>>> burst = Candidate("inc-1", "dma-01", None, "burst", "major", 900.0, 1000, 5000, False)
>>> anomaly = Subject("dma-01", "mtr-7", "anomaly", "minor", None, 2000, 2000)
>>> decide(anomaly, [burst], window_ms=3_600_000)
Decision(incident_id='inc-1', escalate=False, reopen=False, rule='district-wide incident')
>>> decide(Subject("dma-01", None, "burst", "critical", 900.0, 6000, 6000), [burst], 3_600_000)
Decision(incident_id='inc-1', escalate=True, reopen=False, rule='district-wide incident')
>>> decide(Subject("dma-02", "mtr-9", "leak", "minor", 30.0, 2000, 2000), [burst], 3_600_000)
Decision(incident_id=None, escalate=False, reopen=False, rule='new incident')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

HYDRAULIC = frozenset({"leak", "burst", "anomaly"})
DEVICE = frozenset({"sensor_fault", "silent"})
SEVERITY_RANK = {"info": 0, "minor": 1, "major": 2, "critical": 3}
KIND_RANK = {"anomaly": 0, "leak": 1, "burst": 2, "silent": 0, "sensor_fault": 1}
LOSS_ESCALATION = 1.5
"""New evidence escalates when its estimated loss is this many times the incident's."""


class Subject(NamedTuple):
    """What the mediator needs to know of an alert."""

    district: str
    device_id: str | None
    kind: str
    severity: str
    est_loss_lph: float | None
    first_ts_ms: int
    last_ts_ms: int


class Candidate(NamedTuple):
    """An incident an alert might join (open, or reopenable)."""

    incident_id: str
    district: str
    device_id: str | None
    kind: str
    severity: str
    est_loss_lph: float | None
    first_ts_ms: int
    last_ts_ms: int
    closed: bool


class Decision(NamedTuple):
    """Join ``incident_id`` (None: open a new incident), escalate it, reopen it; and why."""

    incident_id: str | None
    escalate: bool
    reopen: bool
    rule: str


def compatible(a: str, b: str) -> bool:
    """Whether alert kinds ``a`` and ``b`` can describe one incident.

    >>> compatible("burst", "anomaly"), compatible("leak", "silent")
    (True, False)
    """
    return (a in HYDRAULIC and b in HYDRAULIC) or (a in DEVICE and b in DEVICE)


def family(kind: str) -> str:
    """``pipes`` for hydraulic kinds, ``meters`` for device faults: the crew skill needed.

    >>> family("burst"), family("silent")
    ('pipes', 'meters')
    """
    return "pipes" if kind in HYDRAULIC else "meters"


def decide(subject: Subject, candidates: Iterable[Candidate], window_ms: int) -> Decision:
    """Choose the incident ``subject`` joins among ``candidates``; see the module doc."""
    near = sorted(
        (c for c in candidates
         if c.district == subject.district and compatible(c.kind, subject.kind)
         and subject.first_ts_ms <= c.last_ts_ms + window_ms
         and subject.last_ts_ms >= c.first_ts_ms - window_ms),
        key=lambda c: (c.closed, c.first_ts_ms, c.incident_id),
    )
    rules: list[tuple[str, list[Candidate]]] = [
        ("same device", [c for c in near
                         if subject.device_id is not None and c.device_id == subject.device_id]),
        ("district-wide incident", [c for c in near if c.device_id is None]),
        ("anomalies become district-wide", [c for c in near if subject.device_id is None
                                            and c.kind == "anomaly"]),
        ("anomaly cluster", [c for c in near if subject.kind == "anomaly"
                             and subject.device_id is not None and c.kind in HYDRAULIC]),
    ]
    for rule, matches in rules:
        if matches:
            chosen = matches[0]
            return Decision(chosen.incident_id, escalates(subject, chosen), chosen.closed, rule)
    return Decision(None, False, False, "new incident")


def escalates(subject: Subject, incident: Candidate) -> bool:
    """Whether the alert is worse news than its incident knew: severity or loss.

    >>> c = Candidate("i", "d", None, "leak", "minor", 100.0, 0, 0, False)
    >>> escalates(Subject("d", None, "leak", "minor", 149.0, 0, 0), c)
    False
    >>> escalates(Subject("d", None, "leak", "minor", 150.0, 0, 0), c)
    True
    """
    if SEVERITY_RANK[subject.severity] > SEVERITY_RANK[incident.severity]:
        return True
    if KIND_RANK.get(subject.kind, 0) > KIND_RANK.get(incident.kind, 0) and compatible(
            subject.kind, incident.kind):
        return True
    new, old = subject.est_loss_lph, incident.est_loss_lph
    return new is not None and new > 0 and (old is None or new >= old * LOSS_ESCALATION)


def merged_kind(a: str, b: str) -> str:
    """The more specific of two compatible kinds.

    >>> merged_kind("anomaly", "burst"), merged_kind("silent", "sensor_fault")
    ('burst', 'sensor_fault')
    """
    return a if KIND_RANK.get(a, 0) >= KIND_RANK.get(b, 0) else b


def merged_severity(a: str, b: str) -> str:
    """The higher of two severities.

    >>> merged_severity("minor", "critical")
    'critical'
    """
    return a if SEVERITY_RANK[a] >= SEVERITY_RANK[b] else b
