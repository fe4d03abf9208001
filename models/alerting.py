"""Alert policy: from detector scores to contract :class:`~meshwatch.contract.events.Alert`s.

Scores arrive per *category* (what the alert is about: :data:`CATEGORIES`) and per subject
(a device or a district, by slot number). For each (category, subject) the policy keeps a
small track and applies, in this order:

- **Hysteresis**: an alert opens when a score reaches ``open_threshold`` (0.9, the
  detectors' threshold) and clears only after scores stayed below ``clear_threshold`` for
  ``clear_after_h`` hours of event time (per category: ``clear_after_h_by_category``; a
  repaired burst clears after 15 minutes), so a score hovering at the threshold does not
  flap.
- **Folding**: a subject whose alert cleared less than ``fold_h`` hours ago (per category:
  ``fold_h_by_category``; a burst an hour after the last one is a new burst) and crosses
  the threshold again re-opens *the same* alert (status ``update``, same id): one incident,
  one alert. A district leak's verdict comes once a night, so its alert clears only after
  a whole night back at the district's baseline (the leak was repaired); a rise on a later
  night is a new leak and gets its own alert (``fold_h`` 12 hours, less than the 18 hours
  from a clearing to the next night's verdict).
- **Fusion**: a category can be suppressed by another on the same subject
  (:attr:`PolicySettings.suppressed_by`): a customer leak does not open while the meter has
  a fault alert open (a stuck register reads a steady flow), and a district leak does not
  open during a burst or 36 hours after it (a burst raises the night flow, and a night's
  verdict holds until the next night ends).
- **Rate limits**: at most ``max_opens_per_day`` new alerts per subject and category in any
  24 hours, and updates of an open alert at most every ``update_every_h`` hours, and only
  when its severity rises or its estimated loss changes by half.
- **Feedback**: :meth:`AlertPolicy.close_by_feedback` clears an alert that a crew found to
  be false; while the condition persists the policy re-alerts (a new incident) only after
  ``realert_h`` hours, unless the detectors learned the pattern (see :mod:`models.feedback`).

Alert ids are deterministic: ``al-<category>-<hash>`` of the category, the subject and the
event time at which the incident opened, so replaying the same data gives the same ids.

>>> import numpy as np
>>> policy = AlertPolicy()
>>> ids = np.array(["mtr-0000001", "mtr-0000002"], dtype=object)
>>> hour = 3_600_000
>>> t0 = 1_767_571_200_000
>>> alerts = []
>>> for i, score in enumerate([0.2, 0.95, 0.97, 0.3, 0.96, 0.1]):
...     alerts += policy.observe("customer_leak", np.array([0]), np.array([t0 + i * hour]),
...                              np.array([score]), {"est_leak_lph": np.array([12.0])}, ids)
>>> [(a.status.value, a.kind.value, a.device_id) for a in alerts]
[('open', 'leak', 'mtr-0000001')]
>>> alerts[0].alert_id == make_alert_id("customer_leak", "mtr-0000001", t0 + hour)
True
>>> for i in range(6, 20):
...     alerts += policy.observe("customer_leak", np.array([0]), np.array([t0 + i * hour]),
...                              np.array([0.0]), {"est_leak_lph": np.array([0.0])}, ids)
>>> [a.status.value for a in alerts], alerts[-1].last_ts_ms == t0 + 11 * hour
(['open', 'cleared'], True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from meshwatch.contract.events import Alert, AlertKind, AlertStatus, Severity
from models.water.sensor_faults import FAULT_NAMES

MODEL_VERSION = "water-1.0"
"""The version of the water detectors and this policy, carried by every alert."""

MS_PER_HOUR = 3_600_000

CATEGORIES: dict[str, AlertKind] = {
    "customer_leak": AlertKind.LEAK,
    "network_leak": AlertKind.LEAK,
    "burst": AlertKind.BURST,
    "sensor_fault": AlertKind.SENSOR_FAULT,
    "clock_skew": AlertKind.SENSOR_FAULT,
    "silent": AlertKind.SILENT,
}
"""Alert categories and the contract kind each one produces."""

DISTRICT_CATEGORIES = frozenset({"network_leak", "burst"})
"""Categories whose subject is a district (the others are about a device)."""

LOSS_EVIDENCE = {"customer_leak": "est_leak_lph", "network_leak": "est_loss_lph"}
"""The evidence field holding the estimated loss (L/h) of each category that has one."""

SEVERITY_STEPS_LPH = {
    "customer_leak": (20.0, 100.0),
    "network_leak": (500.0, 1500.0),
}
"""Loss (L/h) at which a leak becomes ``major`` and ``critical``; below: ``minor``."""


@dataclass(frozen=True)
class PolicySettings:
    """Hyper-parameters of :class:`AlertPolicy` (see the module docs)."""

    open_threshold: float = 0.9
    clear_threshold: float = 0.5
    clear_after_h: float = 6.0
    clear_after_h_by_category: Mapping[str, float] = field(default_factory=lambda: {
        "burst": 0.25})
    fold_h: float = 48.0
    fold_h_by_category: Mapping[str, float] = field(default_factory=lambda: {
        "burst": 1.0, "silent": 6.0, "clock_skew": 12.0, "network_leak": 12.0})
    update_every_h: float = 24.0
    max_opens_per_day: int = 3
    realert_h: float = 24.0
    suppressed_by: Mapping[str, tuple[tuple[str, float], ...]] = field(default_factory=lambda: {
        "customer_leak": (("sensor_fault", 0.0),),
        "network_leak": (("burst", 36.0),),
    })
    model_version: str = MODEL_VERSION


def make_alert_id(category: str, subject: str, start_ms: int) -> str:
    """The deterministic id of the incident of ``category`` on ``subject`` opened at ``start_ms``.

    >>> make_alert_id("burst", "dma-01", 1_767_571_200_000)
    'al-burst-fe9c36d79863872ad981'
    """
    digest = hashlib.sha256(f"{category}|{subject}|{start_ms}".encode()).hexdigest()[:20]
    return f"al-{category.replace('_', '-')}-{digest}"


def severity_of(category: str, score: float, loss_lph: float | None,
                evidence: Mapping[str, float]) -> Severity:
    """How urgent an alert is: by estimated loss for leaks, by kind for the rest.

    >>> severity_of("customer_leak", 0.95, 150.0, {}).value
    'critical'
    >>> severity_of("silent", 0.95, None, {"cadence_s": 60.0}).value
    'major'
    """
    if category in SEVERITY_STEPS_LPH and loss_lph is not None:
        major, critical = SEVERITY_STEPS_LPH[category]
        if loss_lph >= critical:
            return Severity.CRITICAL
        return Severity.MAJOR if loss_lph >= major else Severity.MINOR
    if category == "burst":
        return Severity.CRITICAL
    if category == "silent":
        return Severity.MAJOR if evidence.get("cadence_s", 900.0) <= 60.0 else Severity.MINOR
    return Severity.MINOR


_SEVERITY_RANK = {severity: rank for rank, severity in enumerate(Severity)}


@dataclass
class _Track:
    """What the policy remembers about one (category, subject)."""

    alert_id: str | None = None
    open: bool = False
    start_ms: int = 0
    last_ms: int = 0
    below_since: int | None = None
    cleared_ms: int | None = None
    sent_ms: int = 0
    severity: Severity = Severity.INFO
    loss: float | None = None
    score: float = 0.0
    opens: list[int] = field(default_factory=list)
    feedback_ms: int | None = None
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AlertRecord:
    """What the policy knows about an alert it raised: enough to apply feedback to it."""

    alert_id: str
    category: str
    slot: int
    subject: str
    start_ms: int
    evidence: dict[str, float]


class AlertPolicy:
    """Hysteresis, folding, fusion and rate limits over detector scores (see module docs)."""

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self._tracks: dict[tuple[str, int], _Track] = {}
        self._active: dict[str, set[int]] = {category: set() for category in CATEGORIES}
        self._active_array: dict[str, np.ndarray | None] = dict.fromkeys(CATEGORIES)
        self.records: dict[str, AlertRecord] = {}
        """Every alert raised, by id."""
        self.suppressed = 0
        """Openings held back by fusion."""
        self.rate_limited = 0
        """Openings held back by the rate limit."""
        self._muted: dict[tuple[str, int], int] = {}

    # -- scores in ---------------------------------------------------------------------------
    def observe(
        self, category: str, slot: np.ndarray, ts_ms: np.ndarray, score: np.ndarray,
        evidence: Mapping[str, np.ndarray], subject_ids: np.ndarray,
        district_ids: np.ndarray | None = None, extra: Mapping[str, str] | None = None,
    ) -> list[Alert]:
        """Apply the policy to a block of scores; returns the alert messages it produces.

        ``slot`` indexes ``subject_ids`` (device or district ids); ``district_ids`` (by the
        same slot) fills the alert's district for device categories.
        """
        if category not in CATEGORIES:
            msg = f"unknown alert category {category!r}; known: {sorted(CATEGORIES)}"
            raise ValueError(msg)
        cfg = self.settings
        rows = score >= cfg.clear_threshold
        active = self._active_slots(category)
        if active is not None:
            rows |= np.isin(slot, active)
        alerts: list[Alert] = []
        for i in np.flatnonzero(rows).tolist():
            s = int(slot[i])
            alert = self._one(category, s, int(ts_ms[i]), float(score[i]),
                              {name: float(values[i]) for name, values in evidence.items()},
                              subject_ids, district_ids, extra)
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _active_slots(self, category: str) -> np.ndarray | None:
        cached = self._active_array[category]
        if cached is None and self._active[category]:
            cached = np.fromiter(self._active[category], np.int64)
            self._active_array[category] = cached
        return cached

    def _set_active(self, category: str, slot: int, active: bool) -> None:
        members = self._active[category]
        if active != (slot in members):
            if active:
                members.add(slot)
            else:
                members.discard(slot)
            self._active_array[category] = None

    def _one(self, category: str, slot: int, ts: int, score: float, evidence: dict[str, float],
             subject_ids: np.ndarray, district_ids: np.ndarray | None,
             extra: Mapping[str, str] | None) -> Alert | None:
        cfg = self.settings
        key = (category, slot)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
            self._set_active(category, slot, True)
        loss_name = LOSS_EVIDENCE.get(category)
        loss = evidence.get(loss_name) if loss_name else None
        if category == "burst":
            loss = max(evidence.get("rise_lpm", 0.0), 0.0) * 60.0
        hour = MS_PER_HOUR
        if track.open:
            track.last_ms = ts
            if score >= cfg.clear_threshold:
                track.below_since = None
                track.score = max(track.score, score)
                severity = severity_of(category, score, loss, evidence)
                changed = (_SEVERITY_RANK[severity] > _SEVERITY_RANK[track.severity]
                           or (loss is not None and track.loss is not None
                               and abs(loss - track.loss) > 0.5 * max(track.loss, 1e-9)))
                if (score >= cfg.open_threshold and changed
                        and ts - track.sent_ms >= cfg.update_every_h * hour):
                    track.severity = max(severity, track.severity, key=_SEVERITY_RANK.get)
                    track.loss, track.evidence = loss, evidence
                    return self._message(category, slot, track, AlertStatus.UPDATE, ts, score,
                                         subject_ids, district_ids, extra)
                return None
            if track.below_since is None:
                track.below_since = ts
            if ts - track.below_since >= cfg.clear_after_h_by_category.get(
                    category, cfg.clear_after_h) * hour:
                track.open = False
                track.cleared_ms = ts
                return self._message(category, slot, track, AlertStatus.CLEARED, ts, score,
                                     subject_ids, district_ids, extra)
            return None
        if score < cfg.open_threshold:
            idle_since = track.cleared_ms if track.cleared_ms is not None else track.feedback_ms
            if track.alert_id is None or (
                    idle_since is not None
                    and ts - idle_since > max(cfg.fold_h, cfg.realert_h) * hour):
                self._set_active(category, slot, False)
                del self._tracks[key]
            return None
        if self._suppressed(category, slot, ts):
            self.suppressed += 1
            return None
        if self._muted.get(key, 0) > ts:
            return None
        if track.feedback_ms is not None and ts - track.feedback_ms < cfg.realert_h * hour:
            return None
        track.severity = severity_of(category, score, loss, evidence)
        track.loss, track.score, track.evidence = loss, score, evidence
        track.below_since = None
        track.last_ms = ts
        if (track.alert_id is not None and track.feedback_ms is None
                and track.cleared_ms is not None
                and ts - track.cleared_ms <= cfg.fold_h_by_category.get(category, cfg.fold_h)
                * hour):
            track.open = True  # the same incident again: fold into its alert
            return self._message(category, slot, track, AlertStatus.UPDATE, ts, score,
                                 subject_ids, district_ids, extra)
        track.opens = [t for t in track.opens if ts - t < 24 * hour]
        if len(track.opens) >= cfg.max_opens_per_day:
            self.rate_limited += 1
            return None
        track.opens.append(ts)
        subject = str(subject_ids[slot])
        track.alert_id = make_alert_id(category, subject, ts)
        track.start_ms = ts
        track.open = True
        track.cleared_ms = track.feedback_ms = None
        self.records[track.alert_id] = AlertRecord(track.alert_id, category, slot, subject, ts,
                                                   dict(evidence))
        return self._message(category, slot, track, AlertStatus.OPEN, ts, score, subject_ids,
                             district_ids, extra)

    def _suppressed(self, category: str, slot: int, ts: int) -> bool:
        for other, within_h in self.settings.suppressed_by.get(category, ()):
            track = self._tracks.get((other, slot))
            if track is None or track.alert_id is None:
                continue
            if track.open or (track.cleared_ms is not None
                              and ts - track.cleared_ms <= within_h * MS_PER_HOUR):
                return True
        return False

    def _message(self, category: str, slot: int, track: _Track, status: AlertStatus, ts: int,
                 score: float, subject_ids: np.ndarray, district_ids: np.ndarray | None,
                 extra: Mapping[str, str] | None) -> Alert:
        assert track.alert_id is not None
        track.sent_ms = ts
        subject = str(subject_ids[slot])
        evidence: dict[str, float | str] = {"category": category}
        evidence.update({name: round(value, 4) for name, value in track.evidence.items()
                         if math.isfinite(value)})
        if "fault" in track.evidence and CATEGORIES[category] is AlertKind.SENSOR_FAULT:
            evidence["fault"] = FAULT_NAMES[int(track.evidence["fault"])]
        if extra:
            evidence.update(extra)
        district = None
        if category in DISTRICT_CATEGORIES:
            device = None
            district = subject
        else:
            device = subject
            if district_ids is not None:
                district = str(district_ids[slot])
        loss = None if track.loss is None else round(max(track.loss, 0.0), 3)
        return Alert(
            alert_id=track.alert_id, device_id=device, district=district,
            kind=CATEGORIES[category], severity=track.severity, status=status,
            score=min(max(score, 0.0), 1.0), est_loss_lph=loss, evidence=evidence,
            first_ts_ms=track.start_ms, last_ts_ms=max(ts, track.start_ms),
            model_version=self.settings.model_version,
        )

    # -- feedback ----------------------------------------------------------------------------
    def close_by_feedback(self, alert_id: str, ts_ms: int) -> Alert | None:
        """Clear an alert a crew found false; returns the ``cleared`` message, if it was open.

        The track remembers the feedback, so the policy does not re-alert on the same
        subject and category for ``realert_h`` hours.
        """
        record = self.records.get(alert_id)
        if record is None:
            return None
        track = self._tracks.get((record.category, record.slot))
        if track is None or track.alert_id != alert_id:
            return None
        was_open = track.open
        track.open = False
        track.feedback_ms = ts_ms
        track.cleared_ms = None
        if not was_open:
            return None
        subjects = np.array([record.subject] * (record.slot + 1), dtype=object)
        return self._message(record.category, record.slot, track, AlertStatus.CLEARED,
                             max(ts_ms, track.start_ms), track.score, subjects, None,
                             {"cleared_by": "feedback"})

    def mute(self, category: str, slot: int, until_ms: int) -> None:
        """Open no new alert of ``category`` on ``slot`` before ``until_ms`` (feedback)."""
        key = (category, slot)
        self._muted[key] = max(self._muted.get(key, 0), until_ms)

    def open_alerts(self) -> list[str]:
        """Ids of the alerts open now."""
        return [track.alert_id for track in self._tracks.values()
                if track.open and track.alert_id is not None]
