"""Columnar reading sets: :class:`Readings` inside the engine, :class:`ReadingBlock` out of it.

A :class:`ReadingBlock` is what one gateway sends in one go: readings of one device kind
(so one set of metric names), as numpy columns. It turns into contract messages with
:meth:`ReadingBlock.to_batches` (pydantic models) or :meth:`ReadingBlock.to_json_payloads`
(the same bytes as :func:`meshwatch.contract.encode`, ~10× faster, written by
:func:`meshwatch.contract.wire.telemetry_payloads`).

>>> import numpy as np
>>> block = ReadingBlock(
...     site="dma-01", gateway_id="dma-01-gw-001", kind="customer_meter",
...     sent_ms=1_767_571_230_000, id_table=np.array(["mtr-0000001", "mtr-0000002"], object),
...     device_index=np.array([0, 1], np.int32), ts_ms=np.array([1_767_571_200_000] * 2),
...     seq=np.array([0, 0]), metrics={"flow_lpm": np.array([0.0, 1.25])})
>>> len(block), list(block.device_ids)
(2, ['mtr-0000001', 'mtr-0000002'])
>>> from meshwatch.contract import encode
>>> batches = block.to_batches(max_readings=1)
>>> [len(batch.readings) for batch in batches]
[1, 1]
>>> block.to_json_payloads(max_readings=1) == [encode(batch) for batch in batches]
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshwatch.contract import Reading, TelemetryBatch
from meshwatch.contract.wire import telemetry_payloads

MAX_READINGS_PER_BATCH = 10_000
"""The contract's limit of readings in one TelemetryBatch."""


@dataclass(frozen=True, eq=False)
class Readings:
    """Readings of one device kind as columns; ``device`` indexes the fleet's devices."""

    device: np.ndarray  # int32
    ts_ms: np.ndarray  # int64, as reported (clock skew included)
    seq: np.ndarray  # int64
    metrics: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.device)

    def take(self, index: np.ndarray | slice) -> Readings:
        """The readings at ``index`` (a boolean mask, integer positions or a slice)."""
        return Readings(self.device[index], self.ts_ms[index], self.seq[index],
                        {name: values[index] for name, values in self.metrics.items()})

    @staticmethod
    def concat(parts: list[Readings]) -> Readings:
        """One reading set holding ``parts`` in order; they must share metric names."""
        if len(parts) == 1:
            return parts[0]
        return Readings(np.concatenate([p.device for p in parts]),
                        np.concatenate([p.ts_ms for p in parts]),
                        np.concatenate([p.seq for p in parts]),
                        {name: np.concatenate([p.metrics[name] for p in parts])
                         for name in parts[0].metrics})


@dataclass(frozen=True, eq=False)
class ReadingBlock:
    """Readings one gateway delivers at ``sent_ms``, as columns, in delivery order.

    ``device_index`` points into ``id_table`` (the fleet's shared id array, never copied);
    ``metrics`` maps contract metric names to float64 arrays, already rounded to the
    precision the devices report (3 decimals).
    """

    site: str
    gateway_id: str
    kind: str
    sent_ms: int
    id_table: np.ndarray
    device_index: np.ndarray
    ts_ms: np.ndarray
    seq: np.ndarray
    metrics: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.device_index)

    @property
    def device_ids(self) -> np.ndarray:
        """The device id of each reading (a new object array)."""
        return self.id_table[self.device_index]

    def to_batches(self, max_readings: int = 1000) -> list[TelemetryBatch]:
        """Contract batches of at most ``max_readings`` readings, in order.

        Built with ``model_construct``: the simulator's values are valid by construction
        (ids match the id pattern, times are in range, metrics are finite).
        """
        _check_batch_size(max_readings)
        names = list(self.metrics)
        columns = [self.metrics[name].tolist() for name in names]
        readings = [
            Reading.model_construct(device_id=device, ts_ms=ts, seq=seq,
                                    metrics=dict(zip(names, values, strict=True)), quality=())
            for device, ts, seq, *values in zip(self.device_ids.tolist(), self.ts_ms.tolist(),
                                                self.seq.tolist(), *columns, strict=True)
        ]
        return [
            TelemetryBatch.model_construct(site=self.site, gateway_id=self.gateway_id,
                                           sent_ms=self.sent_ms,
                                           readings=readings[i:i + max_readings])
            for i in range(0, len(readings), max_readings)
        ]

    def to_json_payloads(self, max_readings: int = 1000) -> list[bytes]:
        """The JSON payloads :func:`meshwatch.contract.encode` would give for :meth:`to_batches`.

        Raises ``ValueError`` if the block breaks the contract (see :mod:`meshwatch.contract.wire`).
        """
        _check_batch_size(max_readings)
        return telemetry_payloads(self.site, self.gateway_id, self.sent_ms,
                                  self.device_ids, self.ts_ms, self.seq, self.metrics,
                                  max_readings)


def _check_batch_size(max_readings: int) -> None:
    if not 1 <= max_readings <= MAX_READINGS_PER_BATCH:
        msg = (f"max_readings is {max_readings}; a TelemetryBatch holds 1 to "
               f"{MAX_READINGS_PER_BATCH} readings")
        raise ValueError(msg)
