"""Local scoring: feature windows per device, one batched ONNX call, scores and edge alerts.

:class:`EdgeScorer` feeds readings into :class:`models.edge.features.FeatureWindows`; the
windows that close together are scored in one call of the current
:class:`models.edge.package.EdgeModel`. Their scores leave as one :class:`EdgeScore` message
(a batch of window scores, like telemetry) on the gateway's scores topic, carrying the model id
and version, written straight from the score columns (:mod:`meshwatch.contract.wire`). A window
whose score is not a finite number (a broken model) is logged and left out.

Edge alerts: a device whose score reaches ``threshold`` gets one :class:`Alert` on the
gateway's alerts topic, at once, without waiting for the cloud. Alert messages are *urgent*
outbox messages, so the publisher sends them ahead of any telemetry backlog (EdgeScores stay
ordinary); see :mod:`edge_agent.publisher` for the order guarantees of each lane. The alert id
is derived from the device, the kind and the start of the first flagged window, so a replay
gives the same id; while the device stays flagged no new alert is raised, and the first window
back below the threshold sends the same alert id with status ``cleared`` (hysteresis: one alert
per episode, not one per window). The kind comes from the most likely non-normal class
(``leak_like`` → ``leak``, ``fault_like`` → ``sensor_fault``).

:meth:`EdgeScorer.swap` replaces the model between two calls (the agent calls it between
blocks, so no reading is scored half by one model and half by another). A model with another
window spec starts fresh windows; one with the same spec keeps the open windows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from edge_agent.outbox import OutgoingMessage
from meshwatch.contract import Alert, AlertStatus, Severity, encode, topics
from meshwatch.contract.wire import edge_score_payloads
from models.edge.features import FEATURE_NAMES, ClosedWindows, FeatureWindows, pressure_of
from models.edge.package import NORMAL_CLASS, EdgeModel

KIND_OF_CLASS = {"leak_like": "leak", "fault_like": "sensor_fault"}
MAX_WINDOWS_PER_MESSAGE = 10_000
SCORE_DECIMALS = 4
ADD_SLICE = 1024
"""Readings given to the feature windows per call (bounds their temporary arrays)."""
log = logging.getLogger(__name__)
LATENCY_BUCKETS_S = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, float("inf"))
"""Upper bounds of the inference-latency histogram (seconds per batched call)."""


class EdgeScorer:
    """Score one gateway's devices with the current edge model."""

    def __init__(self, model: EdgeModel, *, site: str, gateway_id: str, threshold: float) -> None:
        if not 0 < threshold <= 1:
            msg = f"the edge alert threshold must be in (0, 1], got {threshold}"
            raise ValueError(msg)
        self.site = site
        self.gateway_id = gateway_id
        self.threshold = threshold
        self.scores_topic = topics.build("site_scores", site=site, gateway=gateway_id)
        self.alerts_topic = topics.build("site_alerts", site=site, gateway=gateway_id)
        self.model = model
        self.windows = FeatureWindows(model.window_spec)
        self.windows_scored = 0
        self.alerts_raised = 0
        self.alerts_cleared = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS_S)
        self.latency_sum_s = 0.0
        self._flagged: dict[str, tuple[str, int]] = {}  # device -> (alert kind, first start)

    def swap(self, model: EdgeModel) -> None:
        """Serve ``model`` from the next call on."""
        if model.window_spec != self.model.window_spec:
            self.windows = FeatureWindows(model.window_spec)
        self.model = model

    def readings(
        self, device_ids: np.ndarray, ts_ms: np.ndarray, metrics: Mapping[str, np.ndarray]
    ) -> list[OutgoingMessage]:
        """Add readings with a ``flow_lpm`` column; return score and alert messages to send."""
        flow = metrics.get("flow_lpm")
        if flow is None or len(device_ids) == 0:
            return []
        slots = self.windows.slots(device_ids.tolist())
        pressure = pressure_of(metrics)
        # In slices: the windows' working arrays scale with the readings of one add() call,
        # and the result does not depend on how readings are split (features.py).
        closed = ClosedWindows.concat([
            self.windows.add(slots[i:i + ADD_SLICE], ts_ms[i:i + ADD_SLICE],
                             flow[i:i + ADD_SLICE],
                             None if pressure is None else pressure[i:i + ADD_SLICE])
            for i in range(0, len(slots), ADD_SLICE)])
        return self._score(closed) if len(closed) else []

    def flush(self, until_ms: int) -> list[OutgoingMessage]:
        """Close windows that ended by ``until_ms`` (devices gone silent) and score them."""
        closed = self.windows.flush(until_ms)
        return self._score(closed) if len(closed) else []

    def stats(self) -> dict[str, int | float]:
        """Counters for the agent's stats."""
        return {"windows_scored": self.windows_scored, "edge_alerts": self.alerts_raised,
                "edge_alerts_cleared": self.alerts_cleared,
                "late_readings": self.windows.late_readings}

    def _score(self, closed: ClosedWindows) -> list[OutgoingMessage]:
        model = self.model
        started = time.perf_counter()
        probabilities = model.probabilities(closed.features)
        self._observe(time.perf_counter() - started)
        classes = list(model.manifest.classes)
        scores = np.clip(1.0 - probabilities[:, classes.index(NORMAL_CLASS)], 0.0, 1.0)
        self.windows_scored += len(closed)
        devices = closed.device_ids.tolist()
        # Straight from the columns to EdgeScore JSON: no model object per window.
        rounded = np.array([round(score, SCORE_DECIMALS) for score in scores.tolist()])
        finite = np.isfinite(rounded)
        if not finite.all():
            log.warning("model %s %s gave %d windows no finite score; they are not sent",
                        model.model_id, model.version, int(len(finite) - finite.sum()))
        messages = [
            OutgoingMessage(self.scores_topic, payload, key=self.gateway_id)
            for payload in edge_score_payloads(
                self.site, self.gateway_id, model.model_id, model.version,
                closed.device_ids[finite].tolist(), closed.start_ms[finite],
                closed.end_ms[finite], rounded[finite], MAX_WINDOWS_PER_MESSAGE)
        ] if finite.any() else []
        # Only flagged windows, and windows of flagged devices (they may clear), need Python.
        candidates = np.flatnonzero(scores >= self.threshold).tolist()
        if self._flagged:
            candidates = sorted(set(candidates) | {row for row, device in enumerate(devices)
                                                   if device in self._flagged})
        for row in candidates:
            alert = self._alert(devices[row], float(scores[row]), probabilities[row], classes,
                                closed, row)
            if alert is not None:
                messages.append(OutgoingMessage(self.alerts_topic, encode(alert),
                                                key=devices[row], urgent=True))
        return messages

    def _alert(self, device: str, score: float, probabilities: np.ndarray, classes: list[str],
               closed: ClosedWindows, row: int) -> Alert | None:
        start, end = int(closed.start_ms[row]), int(closed.end_ms[row])
        flagged = self._flagged.get(device)
        if score < self.threshold:
            if flagged is None:
                return None
            del self._flagged[device]
            self.alerts_cleared += 1
            return self._make_alert(device, *flagged, end, score, AlertStatus.CLEARED,
                                    closed.features[row])
        if flagged is not None:
            return None
        ranked = sorted((p, c) for p, c in zip(probabilities.tolist(), classes, strict=True)
                        if c != NORMAL_CLASS)
        kind = KIND_OF_CLASS.get(ranked[-1][1], "anomaly")
        self._flagged[device] = (kind, start)
        self.alerts_raised += 1
        return self._make_alert(device, kind, start, end, score, AlertStatus.OPEN,
                                closed.features[row])

    def _make_alert(self, device: str, kind: str, first_ms: int, last_ms: int, score: float,
                    status: AlertStatus, features: np.ndarray) -> Alert:
        """The alert, with the window's features as evidence for the crew and the cloud."""
        severity = Severity.MAJOR if score >= 0.95 else Severity.MINOR
        return Alert(
            alert_id=f"edge-{device}-{kind}-{first_ms}", device_id=device, kind=kind,
            severity=severity, status=status, score=score, first_ts_ms=first_ms,
            last_ts_ms=last_ms, model_version=self.model.version,
            evidence={"source": "edge", "gateway_id": self.gateway_id,
                      "model_id": self.model.model_id,
                      "window": dict(zip(FEATURE_NAMES, features.tolist(), strict=True))},
        )

    def _observe(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        for index, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_counts[index] += 1
                return
