"""One gateway's edge agent: readings in, durable outbox, MQTT out.

The agent owns an :class:`~edge_agent.outbox.Outbox` and an
:class:`~edge_agent.publisher.OutboxPublisher` thread. Inputs hand it readings:

- :meth:`EdgeAgent.submit_block`: a columnar block whose devices already numbered their
  readings (the fleet simulator, a data concentrator); it is written as telemetry batches of
  at most ``max_batch_readings`` in one outbox transaction.
- :meth:`EdgeAgent.submit_reading`: one reading without a seq (OPC-UA, local MQTT devices);
  the agent assigns the seq and batches by size and delay (:mod:`edge_agent.batcher`).
- :meth:`EdgeAgent.submit_dead_letter`: an input message that broke the contract, kept as a
  ``DeadLetter`` event on the dead-letter topic, so nothing is dropped without a record.

With an :class:`~edge_agent.scoring.EdgeScorer`, the readings also feed per-device feature
windows; closed windows are scored by the edge model and their ``EdgeScore`` events (and edge
alerts) go into the outbox in the same transaction as the telemetry that closed them.

Every message is in the outbox before it is published, so a reading accepted by the agent
survives a broker outage and a ``kill -9``. When the outbox is full (``"refuse"`` policy),
:meth:`submit_block` waits until the publisher has made room: the input is back-pressured,
nothing is dropped. :meth:`close` (what SIGTERM calls) writes pending readings, waits for the
outbox to drain up to a timeout, publishes a clean death and disconnects.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from edge_agent.batcher import ReadingBatcher
from edge_agent.outbox import Outbox, OutboxFull, OutgoingMessage
from edge_agent.publisher import MqttProtocol, OutboxPublisher, TlsOptions
from edge_agent.scoring import EdgeScorer
from meshwatch import __version__
from meshwatch.contract import DeadLetter, QualityFlag, encode, topics
from models.edge.package import EdgeModel


class ColumnarReadings(Protocol):
    """What :meth:`EdgeAgent.submit_block` reads (:class:`simulators.ReadingBlock` is one)."""

    @property
    def gateway_id(self) -> str:
        """The gateway that delivered the readings."""
        ...

    @property
    def ts_ms(self) -> np.ndarray:
        """Event times, UTC epoch ms."""
        ...

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Metric name → values."""
        ...

    @property
    def device_ids(self) -> np.ndarray:
        """The device id of each reading."""
        ...

    def __len__(self) -> int: ...

    def to_json_payloads(self, max_readings: int = ...) -> list[bytes]:
        """The readings as TelemetryBatch JSON payloads of at most ``max_readings``."""
        ...


@dataclass(frozen=True)
class AgentSettings:
    """How one agent runs; the ``[edge]`` section of the configuration maps onto this."""

    site: str
    gateway_id: str
    broker_url: str
    outbox_path: Path
    username: str | None = None
    password: str | None = None
    mqtt_protocol: MqttProtocol = "5"
    tls: TlsOptions | None = None
    outbox_max_bytes: int = 256 * 1024 * 1024
    outbox_full_policy: str = "refuse"
    outbox_synchronous: str = "FULL"
    max_batch_readings: int = 500
    max_batch_delay_s: float = 1.0
    max_in_flight: int = 32
    backlog_rate_per_s: float | None = 500.0
    heartbeat_s: float = 30.0
    full_retry_s: float = 0.05


class EdgeAgent:
    """One gateway: accept readings, store them durably, publish them at QoS1."""

    def __init__(
        self,
        settings: AgentSettings,
        devices: list[str] | None = None,
        scorer: EdgeScorer | None = None,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.topic = topics.site_telemetry(settings.site, settings.gateway_id)
        self.outbox = Outbox(
            settings.outbox_path,
            max_bytes=settings.outbox_max_bytes,
            full_policy=settings.outbox_full_policy,  # type: ignore[arg-type]
            synchronous=settings.outbox_synchronous,  # type: ignore[arg-type]
        )
        self.batcher = ReadingBatcher(
            self.outbox, site=settings.site, gateway_id=settings.gateway_id,
            max_readings=settings.max_batch_readings, max_delay_s=settings.max_batch_delay_s,
        )
        self.publisher = OutboxPublisher(
            self.outbox, settings.broker_url, site=settings.site,
            gateway_id=settings.gateway_id, username=settings.username,
            password=settings.password, max_in_flight=settings.max_in_flight,
            rate_limit_per_s=settings.backlog_rate_per_s, heartbeat_s=settings.heartbeat_s,
            devices=devices or (), agent_version=__version__, protocol=settings.mqtt_protocol,
            tls=settings.tls,
        )
        self.publisher.heartbeat_counters = self.stats  # readings, not only messages
        if scorer is not None:
            self.publisher.model_version = scorer.model.version
        self.readings_in = 0
        self.messages_out = 0
        self.waits_for_room = 0
        self.dead_letters = 0
        self.final_stats: dict[str, int | float] = {}  # stats() as they were at close()
        self._stop = threading.Event()
        self._model_lock = threading.Lock()
        self._offered: EdgeModel | None = None  # swapped in by the next submit_*

    def start(self) -> Self:
        """Start publishing (the publisher connects in the background, with back-off)."""
        self.publisher.start()
        return self

    def stop_waiting(self) -> None:
        """Make a :meth:`submit_block` that waits for room give up (at shutdown)."""
        self._stop.set()

    def submit_block(self, block: ColumnarReadings) -> bool:
        """Store a block's readings as telemetry batches; False if shutdown interrupted a wait.

        Raises:
            ValueError: the block belongs to another gateway, or breaks the contract (a bad
                device id, a non-finite value...; see :mod:`meshwatch.contract.wire`).

        """
        self._swap_offered_model()
        if block.gateway_id != self.settings.gateway_id:
            msg = (f"block of gateway {block.gateway_id} offered to the agent of"
                   f" {self.settings.gateway_id}")
            raise ValueError(msg)
        payloads = block.to_json_payloads(self.settings.max_batch_readings)
        sizes = _split_sizes(len(block), self.settings.max_batch_readings)
        messages = [
            OutgoingMessage(self.topic, payload, key=self.settings.gateway_id, readings=size)
            for payload, size in zip(payloads, sizes, strict=True)
        ]
        if self.scorer is not None:
            messages += self.scorer.readings(block.device_ids, block.ts_ms, block.metrics)
        if not self._append(messages):
            return False
        self.readings_in += len(block)
        return True

    def submit_reading(self, device_id: str, ts_ms: int, metrics: dict[str, float],
                       quality: Sequence[QualityFlag] = ()) -> bool:
        """Accept one reading without a seq; False if shutdown interrupted a wait for room.

        Raises:
            pydantic.ValidationError: the reading breaks the contract; nothing was stored.

        """
        self._swap_offered_model()
        self.batcher.add(device_id, ts_ms, metrics, quality)
        self.readings_in += 1
        if self.scorer is None:
            return True
        columns = {name: np.array([value]) for name, value in metrics.items()}
        return self._append(
            self.scorer.readings(np.array([device_id]), np.array([ts_ms]), columns)
        )

    def submit_dead_letter(self, dead: DeadLetter) -> bool:
        """Store a rejected input message on the gateway's dead-letter topic, like any message.

        The topic is ``mw/v1/site/{site}/gw/{gateway}/deadletter/{reason}``: under the
        gateway's own prefix, which is all its broker account may publish to; the bridge
        forwards dead letters into the mesh.

        Returns False if shutdown interrupted a wait for room (nothing was stored then).
        """
        topic = topics.build("site_dead_letter", site=self.settings.site,
                             gateway=self.settings.gateway_id, reason=dead.reason)
        message = OutgoingMessage(topic, encode(dead),
                                  key=self.settings.gateway_id)
        if not self._append([message]):
            return False
        self.dead_letters += 1
        return True

    def offer_model(self, model: EdgeModel) -> None:
        """Serve ``model`` from the next :meth:`submit_block` or :meth:`submit_reading` on.

        Any thread may call it (the model watcher does). The swap happens between two calls,
        so no block is scored by two models; a later offer replaces one not yet swapped in.

        Raises:
            RuntimeError: the agent has no scorer, so it serves no model.

        """
        if self.scorer is None:
            msg = ("this agent has no scorer, so it serves no model; build it with"
                   " EdgeAgent(..., scorer=EdgeScorer(model, ...))")
            raise RuntimeError(msg)
        with self._model_lock:
            self._offered = model

    def _swap_offered_model(self) -> None:
        """Swap in the model offered since the last call, and say so in a heartbeat."""
        if self._offered is None:  # the common case, without taking the lock
            return
        with self._model_lock:
            model, self._offered = self._offered, None
        if model is None:  # another input thread swapped it in already
            return
        assert self.scorer is not None  # offer_model() checked
        self.scorer.swap(model)
        self.publisher.model_version = model.version
        self.publisher.report(f"model {model.model_id} {model.version} now serving")

    def _append(self, messages: list[OutgoingMessage]) -> bool:
        """Store messages in one transaction, waiting while the outbox is full."""
        while messages:
            try:
                self.outbox.append_many(messages)
            except OutboxFull:
                self.waits_for_room += 1
                if self._stop.wait(self.settings.full_retry_s):
                    return False
                continue
            self.messages_out += len(messages)
            break
        return True

    def tick(self) -> None:
        """Write single readings whose batch waited ``max_batch_delay_s``; call it regularly."""
        self.batcher.flush_due()

    def stats(self) -> dict[str, int | float]:
        """Counters for heartbeats, metrics and reports."""
        return {
            "readings_in": self.readings_in,
            "messages_out": self.messages_out,
            "waits_for_room": self.waits_for_room,
            "dead_letters": self.dead_letters,
            "readings_pending": self.batcher.pending,
            "readings_dropped": self.batcher.dropped + self.outbox.dropped_readings,
            **self.publisher.stats(),
            **(self.scorer.stats() if self.scorer is not None else {}),
        }

    def close(self, timeout_s: float = 10.0) -> bool:
        """Flush pending readings, drain the outbox (up to ``timeout_s``), say goodbye.

        Returns True when everything was delivered; what is left stays in the outbox file
        and goes out at the next start.
        """
        self._stop.set()
        self.batcher.flush()
        drained = self.publisher.close(timeout_s)
        self.final_stats = self.stats()
        self.outbox.close()
        return drained

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _split_sizes(total: int, chunk: int) -> list[int]:
    """Readings per payload when ``total`` readings are cut into chunks of ``chunk``.

    >>> _split_sizes(1201, 500)
    [500, 500, 201]
    """
    return [min(chunk, total - start) for start in range(0, total, chunk)]

