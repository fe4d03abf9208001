"""Feedback: false alarms stop repeating on the same device; outcomes become labels."""

from __future__ import annotations

from collections import Counter

from meshwatch.contract.events import AlertStatus, Feedback, Outcome
from models.evaluate import EvalSettings, simulate_and_detect
from models.feedback import FeedbackApplier
from models.seeds import TUNING_SEEDS
from models.water import CustomerLeakSettings
from models.water.pipeline import PipelineSettings
from simulators import CommRates, IncidentRates

CREW_DELAY_MS = 12 * 3_600_000


def _run_with_crew(learn: bool):
    """A healthy fleet with many round-the-clock businesses and detectors without a
    commissioning period: every alert is false. A crew answers each alert 12 h after it
    opens. ``learn=False`` only closes the work order; ``learn=True`` feeds it back."""
    pending: list[tuple[int, Feedback]] = []
    appliers: dict[int, FeedbackApplier] = {}
    count = 0

    def crew(pipeline, alerts, now_ms):
        nonlocal count
        applier = appliers.setdefault(id(pipeline), FeedbackApplier(pipeline))
        for alert in alerts:
            if alert.status is AlertStatus.OPEN:
                count += 1
                pending.append((now_ms + CREW_DELAY_MS, Feedback(
                    work_order_id=f"wo-{count}", alert_ids=[alert.alert_id],
                    outcome=Outcome.FALSE_ALARM, ts_ms=now_ms + CREW_DELAY_MS)))
        while pending and pending[0][0] <= now_ms:
            _, feedback = pending.pop(0)
            if learn:
                applier.apply(feedback)
            else:
                pipeline.policy.close_by_feedback(feedback.alert_ids[0], feedback.ts_ms)

    settings = EvalSettings(
        meters=300, days=9, warmup_days=1, seed=TUNING_SEEDS[3], districts=1,
        commercial_fraction=0.3, rates=IncidentRates.none(), comms=CommRates.none(),
        pipeline=PipelineSettings(customer_leak=CustomerLeakSettings(learn_continuous_h=None)))
    return simulate_and_detect(settings, hook=crew)


def test_repeat_false_alarms_fall_after_feedback():
    without = _run_with_crew(learn=False)
    with_feedback = _run_with_crew(learn=True)
    assert not [e for e in without.episodes if e.kind not in ("round_the_clock",
                                                              "garden_watering",
                                                              "pool_filling")]

    def opens(run) -> Counter[str]:
        return Counter(a.device_id for a in run.alerts
                       if a.status is AlertStatus.OPEN and a.evidence["category"]
                       == "customer_leak")

    before, after = opens(without), opens(with_feedback)
    repeats_before = sum(n - 1 for n in before.values())
    repeats_after = sum(n - 1 for n in after.values())
    assert len(before) >= 5, "round-the-clock businesses raise first false alarms"
    assert set(after) == set(before), "the first alarm on each device is the same"
    assert repeats_before >= 2 * len(before), "without learning, the crew sees them again"
    assert repeats_after <= repeats_before // 10


def test_feedback_is_idempotent_and_outcomes_become_labels():
    settings = EvalSettings(meters=120, days=3, warmup_days=1, seed=TUNING_SEEDS[4],
                            districts=1,
                            rates=IncidentRates(customer_leak_per_meter_day=0.05))
    run = simulate_and_detect(settings)
    applier = FeedbackApplier(run.pipeline)
    opened = [a for a in run.alerts if a.status is AlertStatus.OPEN
              and a.evidence["category"] == "customer_leak"]
    assert opened
    confirm = Feedback(work_order_id="wo-1", alert_ids=[opened[0].alert_id],
                       outcome=Outcome.CONFIRMED_LEAK, ts_ms=opened[0].last_ts_ms)
    assert applier.apply(confirm) == []
    assert applier.apply(confirm) == []
    assert [label.outcome for label in applier.labels] == ["confirmed_leak"]
    assert applier.labels[0].as_dict()["subject"] == opened[0].device_id
    unknown = Feedback(work_order_id="wo-2", alert_ids=["al-nope"],
                       outcome=Outcome.FALSE_ALARM, ts_ms=opened[0].last_ts_ms)
    applier.apply(unknown)
    assert applier.unknown_alerts == 1
