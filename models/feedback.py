"""Crew feedback into the detectors: false alarms are unlearned, confirmations become labels.

:class:`FeedbackApplier` takes contract :class:`~meshwatch.contract.events.Feedback`
events (idempotent by ``work_order_id``: a repeated event changes nothing) and, for each
alert they name:

- ``false_alarm``: the alert is cleared, and the detector learns the pattern so that the
  same pattern on that device stops alarming: a customer-leak detector *forgives* leak
  rates near the one it flagged (:meth:`~models.water.customer_leak.CustomerLeakFleet.forgive`;
  a real leak on top still alarms), a district-leak detector takes the flagged night level
  as its new normal (:meth:`~models.water.district_leak.DistrictLeakFleet.accept`), and the
  other categories are muted on that subject for ``mute_h`` hours.
- ``meter_fault`` on a leak alert: the meter, not the pipe, was wrong: the alert is cleared
  and leak alerts on that meter are muted for ``mute_h`` hours (until it is replaced).
- ``confirmed_leak`` / ``confirmed_burst``: the alert stands; the outcome becomes a
  :class:`Label` (what a model can later be trained or tuned on).

Every outcome, including ``no_access`` and ``other``, is kept in :attr:`FeedbackApplier.labels`.

>>> import numpy as np
>>> from meshwatch.contract.events import Feedback, Outcome
>>> from models.water.pipeline import FleetLayout, WaterPipeline
>>> layout = FleetLayout(np.array(["mtr-1"], dtype=object), np.array([0], np.int8),
...                      np.array([0], np.int32), ["dma-01"], np.array([900]))
>>> pipeline = WaterPipeline(layout)
>>> t0 = 1_767_571_200_000
>>> def day(first: int) -> list:
...     alerts = []
...     for i in range(first, first + 96):
...         flow = 0.0 if i < 2 else 0.3 + 0.2 * (i % 2)  # never ~0 again: 18 L/h
...         alerts += pipeline.customer_readings(
...             np.array([0]), np.array([t0 + i * 900_000]), {"flow_lpm": np.array([flow])})
...     return alerts
>>> opened = [a for a in day(1) + day(97) if a.status.value == "open"]
>>> len(opened), opened[0].est_loss_lph
(1, 18.0)
>>> applier = FeedbackApplier(pipeline)
>>> feedback = Feedback(work_order_id="wo-1", alert_ids=[opened[0].alert_id],
...                     outcome=Outcome.FALSE_ALARM, ts_ms=t0 + 193 * 900_000)
>>> [a.status.value for a in applier.apply(feedback)], applier.apply(feedback)
(['cleared'], [])
>>> [a for a in day(194) + day(290) if a.status.value == "open"]  # forgiven: no repeat
[]
>>> applier.labels[0].outcome, applier.labels[0].category
('false_alarm', 'customer_leak')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from meshwatch.contract.events import Alert, Feedback, Outcome
from models.water.pipeline import WaterPipeline

MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class Label:
    """One crew outcome for one alert: what really happened, for training and tuning."""

    work_order_id: str
    alert_id: str
    outcome: str
    category: str
    subject: str
    start_ms: int
    ts_ms: int

    def as_dict(self) -> dict[str, Any]:
        """The label as a JSON-ready dict."""
        return asdict(self)


class FeedbackApplier:
    """Applies :class:`~meshwatch.contract.events.Feedback` to a pipeline (see module docs)."""

    def __init__(self, pipeline: WaterPipeline, mute_h: float = 24.0 * 30) -> None:
        self.pipeline = pipeline
        self.mute_h = mute_h
        self.labels: list[Label] = []
        """Every outcome applied, one per (work order, alert)."""
        self.unknown_alerts = 0
        """Alert ids named by feedback that this pipeline never raised."""
        self._done: set[str] = set()

    def apply(self, feedback: Feedback) -> list[Alert]:
        """Apply one feedback event; returns the alert messages it causes (``cleared``)."""
        if feedback.work_order_id in self._done:
            return []
        self._done.add(feedback.work_order_id)
        policy = self.pipeline.policy
        messages: list[Alert] = []
        for alert_id in feedback.alert_ids:
            record = policy.records.get(alert_id)
            if record is None:
                self.unknown_alerts += 1
                continue
            self.labels.append(Label(feedback.work_order_id, alert_id, feedback.outcome.value,
                                     record.category, record.subject, record.start_ms,
                                     feedback.ts_ms))
            until = feedback.ts_ms + int(self.mute_h * MS_PER_HOUR)
            if feedback.outcome is Outcome.FALSE_ALARM:
                self._unlearn(record.category, record.slot, record.evidence, until)
            elif feedback.outcome is Outcome.METER_FAULT and record.category == "customer_leak":
                policy.mute(record.category, record.slot, until)
            else:
                continue
            cleared = policy.close_by_feedback(alert_id, feedback.ts_ms)
            if cleared is not None:
                messages.append(cleared)
        return messages

    def _unlearn(self, category: str, slot: int, evidence: dict[str, float],
                 until_ms: int) -> None:
        pipeline = self.pipeline
        if category == "customer_leak":
            pipeline.leak.forgive(slot, evidence.get("est_leak_lph", 0.0))
        elif category == "network_leak":
            pipeline.district_leak.accept(slot)
        else:
            pipeline.policy.mute(category, slot, until_ms)
