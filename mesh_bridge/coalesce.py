"""Merging forwarded readings of consecutive site messages into fewer, larger mesh messages.

A site batch of 100 readings spreads over up to P partitions. Published as they come, that is
up to P small QoS1 messages per site message, each a round trip for the cloud broker and a
message for every consumer. The :class:`Coalescer` keeps one open batch per (partition,
site, gateway) and appends each routed :class:`~mesh_bridge.route.PartitionBatch` to it. A
batch is closed into a :class:`MeshMessage` when it holds ``max_readings`` readings (or before
a part would take it past the contract's 10,000), or when
the caller flushes (the bridge does when its input goes quiet, when it holds as many site
messages as it may, and when stopping).

- Readings keep their arrival order within a batch and batches close in order, so per-device
  order holds in every partition (a device's readings come through one gateway).
- A merged batch's ``sent_ms`` is the earliest of its parts, so lag is never understated. The
  late flag was already set per site batch by the router.
- Each mesh message names its ``owners``: the tokens given to :meth:`Coalescer.add` whose
  readings it holds. Every ``add`` of ``n`` partition batches yields exactly ``n`` owner
  entries over the messages closed later, which is what the bridge counts down to acknowledge
  a site message only once all mesh messages holding its readings are PUBACKed.

>>> from meshwatch.contract import Reading, TelemetryBatch, decode
>>> T0 = 1767225600000
>>> def part(partition, seq, sent_ms=T0):
...     reading = Reading(device_id=f"m{partition}", ts_ms=T0, seq=seq, metrics={"flow_lpm": 1.0})
...     return PartitionBatch(partition, "s1", "gw-1", sent_ms, [reading])
>>> coalescer = Coalescer(partitions=4, max_readings=2)
>>> coalescer.add("site-msg-1", [part(0, 1), part(3, 1)])
[]
>>> [(m.topic, m.owners) for m in coalescer.add("site-msg-2", [part(0, 2, T0 + 60_000)])]
[('mw/v1/mesh/telemetry/0', ['site-msg-1', 'site-msg-2'])]
>>> [m] = coalescer.flush()
>>> batch = decode(m.payload, TelemetryBatch)
>>> m.topic, m.owners, batch.sent_ms == T0, [r.seq for r in batch.readings]
('mw/v1/mesh/telemetry/3', ['site-msg-1'], True, [1])
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mesh_bridge.route import PartitionBatch
from meshwatch.contract import Reading, TelemetryBatch, encode, topics

__all__ = ["DEFAULT_MAX_READINGS", "Coalescer", "MeshMessage"]

DEFAULT_MAX_READINGS = 500
"""A batch closes once it holds this many readings."""
MAX_READINGS = 10_000
"""The contract's limit of readings in one TelemetryBatch: a batch never grows past it."""

Owner = TypeVar("Owner")


@dataclass(slots=True, eq=False)
class MeshMessage(Generic[Owner]):
    """One mesh telemetry message to publish, and the owners whose readings it holds."""

    topic: str
    payload: bytes
    owners: list[Owner]
    readings: int


@dataclass(slots=True, eq=False)
class _Open(Generic[Owner]):
    site: str
    gateway_id: str
    sent_ms: int
    readings: list[Reading] = field(default_factory=list)
    owners: list[Owner] = field(default_factory=list)


class Coalescer(Generic[Owner]):
    """Open batches per (partition, site, gateway); see the module doc."""

    def __init__(self, partitions: int, max_readings: int = DEFAULT_MAX_READINGS) -> None:
        if not 1 <= max_readings <= MAX_READINGS:
            msg = (f"max_readings must be within 1..{MAX_READINGS} (the contract's limit), "
                   f"got {max_readings}")
            raise ValueError(msg)
        self.max_readings = max_readings
        self._topics = [topics.mesh_telemetry(p) for p in range(partitions)]
        self._open: dict[tuple[int, str, str], _Open[Owner]] = {}

    def __len__(self) -> int:
        """Open batches."""
        return len(self._open)

    def add(self, owner: Owner, batches: Iterable[PartitionBatch]) -> list[MeshMessage[Owner]]:
        """Append ``batches`` (of one site message, ``owner``); returns the messages now full."""
        full: list[MeshMessage[Owner]] = []
        for batch in batches:
            key = (batch.partition, batch.site, batch.gateway_id)
            current = self._open.get(key)
            if current is not None and len(current.readings) + len(batch.readings) > MAX_READINGS:
                full.append(self._close(key, current))
                current = None
            if current is None:
                current = self._open[key] = _Open(batch.site, batch.gateway_id, batch.sent_ms)
            elif batch.sent_ms < current.sent_ms:
                current.sent_ms = batch.sent_ms
            current.readings.extend(batch.readings)
            current.owners.append(owner)
            if len(current.readings) >= self.max_readings:
                full.append(self._close(key, current))
        return full

    def flush(self) -> list[MeshMessage[Owner]]:
        """Close every open batch, in the order they were opened."""
        return [self._close(key, batch) for key, batch in list(self._open.items())]

    def _close(self, key: tuple[int, str, str], batch: _Open[Owner]) -> MeshMessage[Owner]:
        del self._open[key]
        out = TelemetryBatch.model_construct(site=batch.site, gateway_id=batch.gateway_id,
                                             sent_ms=batch.sent_ms, readings=batch.readings)
        return MeshMessage(self._topics[key[0]], encode(out), batch.owners, len(batch.readings))
