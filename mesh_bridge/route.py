"""The bridge's decision for one incoming site message: what to publish, and the counts.

Which topic kinds are bridged:

- ``site_telemetry``: decoded as a :class:`TelemetryBatch`, checked, and forwarded to
  ``mesh_telemetry(partition_of(device, P))`` as one :class:`PartitionBatch` per partition
  (same site, gateway and ``sent_ms``; readings in their input order, so per-device order
  holds in a partition). :mod:`mesh_bridge.coalesce` merges them into mesh messages.
- ``site_scores``: decoded as an :class:`EdgeScore`; windows of devices the gateway does not
  own are dead-lettered (``unauthorized_device``), the rest forwarded to
  ``mesh_scores(partition_of(device, P))``, one EdgeScore per partition, so the dataflow joins
  them with the same device's telemetry.
- ``site_alerts``: decoded as an :class:`Alert` (an edge alert); an alert about a device the
  gateway does not own is dead-lettered, the rest forwarded unchanged to
  ``alerts(district or site, kind)`` for remediation.
- ``site_status``: decoded as a :class:`DeviceStatus` and applied to :class:`Identity` (births
  grant devices, deaths release them); consumed, not forwarded.
- ``site_dead_letter``: a gateway's own dead letter, decoded as a :class:`DeadLetter` and
  forwarded unchanged to ``dead_letter(reason)``, the reason being the topic's level (the
  broker's ACL vouches for the topic); counted in ``Counts.dead_letters`` under that reason.
- anything else (model announcements, raw readings, mesh topics...): dead-lettered as
  ``not_bridged``.

Checks on a telemetry batch, in order; each reading ends in exactly one of forwarded,
duplicate or dead-lettered (:mod:`mesh_bridge.ledger`):

1. The topic must parse and the payload must decode, else the whole message is dead-lettered
   with the contract's reason code (``bad_topic``, ``malformed_json``, ...).
2. ``site``/``gateway_id`` in the payload must equal the topic's levels (the broker's ACL
   vouches for the topic, not the payload), else ``gateway_mismatch``.
3. Readings of devices the gateway does not own are split out into one dead letter,
   ``unauthorized_device``, holding a batch of just those readings; the rest go on.
4. Duplicates by ``(device, seq)`` are counted and dropped (:mod:`mesh_bridge.dedup`).
5. Readings older than ``late_horizon_ms`` before the batch's ``sent_ms`` are forwarded with
   :attr:`QualityFlag.LATE` added. ``sent_ms`` rather than the receive time, because it is on
   the same (possibly simulated) clock as event time and it makes the flag the same on every
   redelivery. Time spent queued after sending is the lag, reported as ``Routed.lag_ms``.

>>> from meshwatch.contract import Reading, TelemetryBatch, decode, encode, topics
>>> from meshwatch.registry import Registry
>>> T0 = 1767225600000  # 2026-01-01T00:00:00Z
>>> router = Router(Identity(Registry([])), partitions=4)
>>> _ = router.route(Incoming(topics.site_status("s1", "gw-1"), encode(DeviceStatus(
...     site="s1", gateway_id="gw-1", state="birth", sent_ms=T0, devices=["m1", "m2"])), T0))
>>> readings = [Reading(device_id=d, ts_ms=T0, seq=s, metrics={"flow_lpm": 1.0})
...             for d, s in [("m1", 1), ("m2", 1), ("m1", 1), ("evil", 1)]]
>>> batch = TelemetryBatch(site="s1", gateway_id="gw-1", sent_ms=T0, readings=readings)
>>> routed = router.route(Incoming(topics.site_telemetry("s1", "gw-1"), encode(batch), T0))
>>> [m.topic for m in routed.messages]
['mw/v1/deadletter/unauthorized_device']
>>> [(b.partition, [r.device_id for r in b.readings]) for b in routed.batches]
[(1, ['m2']), (3, ['m1'])]
>>> c = routed.counts
>>> c.readings_in, c.forwarded, c.duplicates, c.dead_lettered, c.balanced
(4, 2, 1, 1, True)
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from mesh_bridge.dedup import Deduplicator, Seen
from mesh_bridge.identity import Identity
from mesh_bridge.ledger import Counts
from meshwatch.contract import (
    Alert,
    ContractError,
    DeadLetter,
    DeviceStatus,
    EdgeScore,
    QualityFlag,
    Reading,
    Reason,
    TelemetryBatch,
    WindowScore,
    decode,
    encode,
    topics,
)
from meshwatch.contract.events import MAX_TS_MS, MIN_TS_MS

DEFAULT_PARTITIONS = 8
DEFAULT_LATE_HORIZON_MS = 3_600_000
MAX_TEXT = 2000
"""DeadLetter text fields are capped at this many characters by the contract."""

_LATE = QualityFlag.LATE


class BridgeReason(StrEnum):
    """Dead-letter reasons of the bridge, beside the contract's :class:`Reason` codes."""

    UNAUTHORIZED_DEVICE = "unauthorized_device"
    GATEWAY_MISMATCH = "gateway_mismatch"
    NOT_BRIDGED = "not_bridged"


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message from a site source, with where and when it was received (UTC epoch ms)."""

    topic: str
    payload: bytes
    received_ms: int
    source_broker: str | None = None
    client_id: str | None = None

    def __post_init__(self) -> None:
        if not MIN_TS_MS <= self.received_ms < MAX_TS_MS:
            msg = f"received_ms must be UTC epoch milliseconds, got {self.received_ms}"
            raise ValueError(msg)


class Message(NamedTuple):
    """A message to publish on the cloud broker (QoS1)."""

    topic: str
    payload: bytes


class PartitionBatch(NamedTuple):
    """Forwarded readings of one site batch that fall in one mesh partition."""

    partition: int
    site: str
    gateway_id: str
    sent_ms: int
    readings: list[Reading]


@dataclass(slots=True)
class Routed:
    """What one input becomes, and its counts; ``lag_ms`` is receive time - ``sent_ms``.

    ``messages`` are ready to publish (dead letters); ``batches`` are the forwarded readings
    by partition, still to be encoded (:mod:`mesh_bridge.coalesce`).
    """

    messages: list[Message] = field(default_factory=list)
    batches: list[PartitionBatch] = field(default_factory=list)
    counts: Counts = field(default_factory=lambda: Counts(messages_in=1))
    lag_ms: int | None = None


class Router:
    """Validates, authorizes, de-duplicates, flags and partitions site messages.

    Holds the identity and de-duplication state, so one router serves all sources of a bridge
    process. Synchronous and I/O-free; see the module doc for the policy and an example.
    """

    def __init__(
        self,
        identity: Identity,
        partitions: int = DEFAULT_PARTITIONS,
        late_horizon_ms: int = DEFAULT_LATE_HORIZON_MS,
        dedup: Deduplicator | None = None,
    ) -> None:
        if partitions < 1 or late_horizon_ms < 0:
            msg = (f"partitions must be >= 1 and late_horizon_ms >= 0, "
                   f"got {partitions} and {late_horizon_ms}")
            raise ValueError(msg)
        self.identity = identity
        self.partitions = partitions
        self.late_horizon_ms = late_horizon_ms
        self.dedup = dedup if dedup is not None else Deduplicator()
        self._partition_cache: dict[str, int] = {}
        self._bridged: dict[str, tuple[type[Any], Callable[..., None]]] = {
            "site_telemetry": (TelemetryBatch, self._telemetry),
            "site_status": (DeviceStatus, self._status),
            "site_scores": (EdgeScore, self._scores),
            "site_alerts": (Alert, self._alert),
            "site_dead_letter": (DeadLetter, self._site_dead_letter),
        }
        self._score_topics = [topics.build("mesh_scores", partition=p) for p in range(partitions)]

    def route(self, incoming: Incoming) -> Routed:
        """Decide what ``incoming`` becomes; never raises for any topic or payload."""
        routed = Routed()
        try:
            topic = topics.parse(incoming.topic)
        except ContractError as exc:
            return self._reject(routed, incoming, exc.reason, exc.detail)
        bridged = self._bridged.get(topic.kind)
        if bridged is None:
            detail = f"topic kind {topic.kind} is not bridged; subscribe to telemetry and status"
            return self._reject(routed, incoming, BridgeReason.NOT_BRIDGED, detail)
        model, handle = bridged
        try:
            event = decode(incoming.payload, model)
        except ContractError as exc:
            return self._reject(routed, incoming, exc.reason, exc.detail)
        handle(routed, incoming, event, topic.params)
        return routed

    def retract(self, routed: Routed) -> None:
        """Forget the seqs of ``routed``'s forwarded readings, when they cannot be published.

        Call it before leaving the input un-acknowledged, so its redelivery is not taken for a
        duplicate.
        """
        for batch in routed.batches:
            for reading in batch.readings:
                self.dedup.forget(reading.device_id, reading.seq)

    def _telemetry(self, routed: Routed, incoming: Incoming, batch: TelemetryBatch,
                   where: dict[str, str]) -> None:
        counts = routed.counts
        readings = batch.readings
        counts.readings_in = len(readings)
        routed.lag_ms = incoming.received_ms - batch.sent_ms
        if not self._same_gateway(routed, incoming, batch.site, batch.gateway_id, where):
            counts.dead_lettered = len(readings)
            return
        _, refused = self.identity.authorize(
            batch.site, batch.gateway_id, [r.device_id for r in readings]
        )
        if refused:
            readings = self._split_refused(routed, incoming, batch, set(refused))
        groups = self._check_and_group(counts, readings, batch.sent_ms - self.late_horizon_ms)
        routed.batches.extend(
            PartitionBatch(partition, batch.site, batch.gateway_id, batch.sent_ms, group)
            for partition, group in sorted(groups.items()))

    def _check_and_group(
        self, counts: Counts, readings: list[Reading], late_before_ms: int
    ) -> dict[int, list[Reading]]:
        check = self.dedup.check
        partition_of = self._partition
        groups: dict[int, list[Reading]] = {}
        duplicates = late = beyond = 0
        for reading in readings:
            device_id = reading.device_id
            seen = check(device_id, reading.seq)
            if seen is Seen.DUPLICATE:
                duplicates += 1
                continue
            if seen is Seen.BEYOND_WINDOW:
                beyond += 1
            if reading.ts_ms < late_before_ms:
                late += 1
                if _LATE not in reading.quality:
                    reading = reading.model_copy(update={"quality": (*reading.quality, _LATE)})
            partition = partition_of(device_id)
            group = groups.get(partition)
            if group is None:
                groups[partition] = [reading]
            else:
                group.append(reading)
        counts.duplicates += duplicates
        counts.late += late
        counts.beyond_window += beyond
        counts.forwarded += len(readings) - duplicates
        return groups

    def _partition(self, device_id: str) -> int:
        partition = self._partition_cache.get(device_id)
        if partition is None:
            if len(self._partition_cache) > self.dedup.max_devices:
                self._partition_cache.clear()
            partition = self._partition_cache[device_id] = topics.partition_of(
                device_id, self.partitions)
        return partition

    @staticmethod
    def _not_owned(site: str, gateway_id: str, refused: list[str] | set[str]) -> str:
        names = ", ".join(sorted(refused))
        return (f"gateway {gateway_id} at site {site} does not own devices [{names}]; add "
                f"them to the registry or to its birth message")

    def _split_refused(
        self, routed: Routed, incoming: Incoming, batch: TelemetryBatch, refused: set[str]
    ) -> list[Reading]:
        kept = [r for r in batch.readings if r.device_id not in refused]
        spoofed = [r for r in batch.readings if r.device_id in refused]
        routed.counts.dead_lettered += len(spoofed)
        detail = self._not_owned(batch.site, batch.gateway_id, refused)
        payload = encode(batch.model_copy(update={"readings": spoofed}))
        self._dead_letter(routed, incoming, BridgeReason.UNAUTHORIZED_DEVICE, detail, payload)
        return kept

    def _scores(self, routed: Routed, incoming: Incoming, scores: EdgeScore,
                where: dict[str, str]) -> None:
        if not self._same_gateway(routed, incoming, scores.site, scores.gateway_id, where):
            return
        windows = scores.windows
        _, refused = self.identity.authorize(scores.site, scores.gateway_id,
                                             [w.device_id for w in windows])
        if refused:
            spoofed = [w for w in windows if w.device_id in refused]
            windows = [w for w in windows if w.device_id not in refused]
            detail = self._not_owned(scores.site, scores.gateway_id, refused)
            payload = encode(scores.model_copy(update={"windows": spoofed}))
            self._dead_letter(routed, incoming, BridgeReason.UNAUTHORIZED_DEVICE, detail,
                              payload)
        groups: dict[int, list[WindowScore]] = {}
        for window in windows:
            groups.setdefault(self._partition(window.device_id), []).append(window)
        for partition, group in sorted(groups.items()):
            out = scores.model_copy(update={"windows": group})
            routed.messages.append(Message(self._score_topics[partition], encode(out)))

    def _alert(self, routed: Routed, incoming: Incoming, alert: Alert,
               where: dict[str, str]) -> None:
        if alert.device_id is not None:
            _, refused = self.identity.authorize(where["site"], where["gateway"],
                                                 [alert.device_id])
            if refused:
                detail = self._not_owned(where["site"], where["gateway"], refused)
                self._reject(routed, incoming, BridgeReason.UNAUTHORIZED_DEVICE, detail)
                return
        topic = topics.alerts(alert.district or where["site"], alert.kind.value)
        routed.messages.append(Message(topic, incoming.payload))

    def _status(self, routed: Routed, incoming: Incoming, status: DeviceStatus,
                where: dict[str, str]) -> None:
        if self._same_gateway(routed, incoming, status.site, status.gateway_id, where):
            claims = self.identity.observe(status)
            routed.counts.status_applied = 1
            routed.counts.claims_refused = len(claims.refused)

    def _site_dead_letter(self, routed: Routed, incoming: Incoming, letter: DeadLetter,
                          where: dict[str, str]) -> None:
        reason = where["reason"]
        routed.messages.append(Message(topics.dead_letter(reason), incoming.payload))
        routed.counts.dead_letters[reason] += 1

    def _same_gateway(
        self, routed: Routed, incoming: Incoming, site: str, gateway_id: str,
        where: dict[str, str],
    ) -> bool:
        if (site, gateway_id) == (where["site"], where["gateway"]):
            return True
        detail = (f"payload names site {site} gateway {gateway_id} but was published on "
                  f"{incoming.topic}; a gateway publishes only under its own topic prefix")
        self._reject(routed, incoming, BridgeReason.GATEWAY_MISMATCH, detail)
        return False

    def _reject(
        self, routed: Routed, incoming: Incoming, reason: Reason | BridgeReason, detail: str
    ) -> Routed:
        self._dead_letter(routed, incoming, reason, detail, incoming.payload)
        return routed

    def _dead_letter(
        self, routed: Routed, incoming: Incoming, reason: Reason | BridgeReason, detail: str,
        payload: bytes,
    ) -> None:
        letter = DeadLetter(
            reason=reason.value,
            detail=detail[:MAX_TEXT],
            payload_b64=base64.b64encode(payload).decode("ascii"),
            received_ms=incoming.received_ms,
            source_broker=_clip(incoming.source_broker),
            source_topic=_clip(incoming.topic),
            client_id=_clip(incoming.client_id),
        )
        routed.messages.append(Message(topics.dead_letter(reason.value), encode(letter)))
        routed.counts.dead_letters[reason.value] += 1


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]
