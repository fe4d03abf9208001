"""Turn single readings (OPC-UA, local MQTT devices) into telemetry batches in the outbox.

A reading that arrives without a ``seq`` gets one here: the first hop that sees a reading
assigns its seq, and the outbox stores each device's next seq in the same transaction as the
batch that used it (:meth:`~edge_agent.outbox.Outbox.append_many`), so a seq is never reused
for another stored reading, across restarts too.

A batch is written when it holds ``max_readings`` readings or its oldest reading has waited
``max_delay_s`` (wall clock), whichever comes first; :meth:`ReadingBatcher.flush` writes what
is pending (at shutdown).

When the outbox refuses a batch (full, ``"refuse"`` policy), the readings stay pending here
and are offered again at the next flush. Pending readings are bounded by ``max_pending``:
beyond it the oldest pending readings are dropped and counted in ``dropped`` (logged): an
OPC-UA server cannot be slowed down, so memory must not grow without limit while the disk is
full. Their seqs are skipped, so the loss shows as a gap in seq downstream.

>>> import tempfile, pathlib
>>> from edge_agent.outbox import Outbox
>>> from meshwatch.contract import TelemetryBatch, decode
>>> box = Outbox(pathlib.Path(tempfile.mkdtemp()) / "o.db", synchronous="NORMAL")
>>> batcher = ReadingBatcher(box, site="dma-01", gateway_id="dma-01-scada", max_readings=2)
>>> batcher.add("dma-01-pump", 1_767_571_260_000, {"flow_lpm": 331.5})
>>> batcher.add("dma-01-pump", 1_767_571_320_000, {"flow_lpm": 330.9})
>>> batch = decode(box.peek(1)[0].payload, TelemetryBatch)
>>> [(r.device_id, r.seq) for r in batch.readings], box.next_seq("dma-01-pump")
([('dma-01-pump', 0), ('dma-01-pump', 1)], 2)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence

from edge_agent.outbox import Outbox, OutboxFull, OutgoingMessage
from meshwatch.contract import QualityFlag, Reading, TelemetryBatch, encode, topics

log = logging.getLogger(__name__)


class ReadingBatcher:
    """Collect readings of one gateway, assign seqs, and append batches to the outbox.

    Not thread-safe: call it from one thread (the agent's input thread).
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        site: str,
        gateway_id: str,
        max_readings: int = 500,
        max_delay_s: float = 1.0,
        max_pending: int = 100_000,
    ) -> None:
        if not 1 <= max_readings <= 10_000:
            msg = f"max_readings must be 1 to 10,000 (a batch's limit), got {max_readings}"
            raise ValueError(msg)
        if max_pending < max_readings:
            msg = f"max_pending ({max_pending}) must be at least max_readings ({max_readings})"
            raise ValueError(msg)
        self.outbox = outbox
        self.site = site
        self.gateway_id = gateway_id
        self.topic = topics.site_telemetry(site, gateway_id)
        self.max_readings = max_readings
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: deque[Reading] = deque()
        self._oldest_at = 0.0
        self._next_seq: dict[str, int] = {}
        self._refused = False  # the outbox refused the last batch

    @property
    def pending(self) -> int:
        """Readings accepted but not yet in the outbox."""
        return len(self._pending)

    def add(
        self,
        device_id: str,
        ts_ms: int,
        metrics: Mapping[str, float],
        quality: Sequence[QualityFlag] = (),
        *,
        now: float | None = None,
    ) -> None:
        """Accept one reading (validated against the contract) and write batches that are due.

        Raises:
            pydantic.ValidationError: the reading breaks the contract (bad id, metric name,
                non-finite value...): the caller reports it; nothing was stored.

        """
        seq = self._next_seq.get(device_id)
        if seq is None:
            seq = self.outbox.next_seq(device_id)
        reading = Reading(
            device_id=device_id, ts_ms=ts_ms, seq=seq, metrics=dict(metrics),
            quality=tuple(quality),
        )
        self._next_seq[device_id] = seq + 1
        now = time.monotonic() if now is None else now
        if not self._pending:
            self._oldest_at = now
        self._pending.append(reading)
        self._shed_excess()
        self.flush_due(now)

    def flush_due(self, now: float | None = None) -> None:
        """Write full batches, and the partial one if its oldest reading waited long enough."""
        now = time.monotonic() if now is None else now
        while len(self._pending) >= self.max_readings:
            if not self._write(self.max_readings):
                return
        if self._pending and now - self._oldest_at >= self.max_delay_s and self._write(
            len(self._pending)
        ):
            self._oldest_at = now

    def flush(self) -> bool:
        """Write everything pending; True if nothing is left (the outbox took it all)."""
        while self._pending:
            if not self._write(min(len(self._pending), self.max_readings)):
                return False
        return True

    def _write(self, count: int) -> bool:
        readings = [self._pending[i] for i in range(count)]
        batch = TelemetryBatch(
            site=self.site, gateway_id=self.gateway_id, sent_ms=int(time.time() * 1000),
            readings=readings,
        )
        next_seq = {r.device_id: r.seq + 1 for r in readings}
        message = OutgoingMessage(self.topic, encode(batch), key=self.gateway_id, readings=count)
        try:
            self.outbox.append_many([message], next_seq=next_seq)
        except OutboxFull as exc:
            if not self._refused:
                log.warning("readings wait in memory (at most %d): %s", self.max_pending, exc)
            self._refused = True
            return False
        if self._refused:
            log.info("the outbox takes readings again")
            self._refused = False
        for _ in range(count):
            self._pending.popleft()
        return True

    def _shed_excess(self) -> None:
        excess = len(self._pending) - self.max_pending
        if excess <= 0:
            return
        for _ in range(excess):
            self._pending.popleft()  # its seq is never stored: a gap downstream
        self.dropped += excess
        log.error(
            "dropped %d readings (%d in all): the outbox is full and %d readings wait in memory;"
            " free disk space or raise the outbox size", excess, self.dropped, self.max_pending,
        )

