"""The bridge's own OPC-UA input: ``[[opcua]]`` subscriptions, a durable queue, bridge jobs.

When ``bridge.opcua_site`` and ``bridge.opcua_gateway_id`` are set, the bridge subscribes to
every ``[[opcua]]`` server itself, with the edge agent's code and mapping config
(:class:`edge_agent.opcua_input.OpcUaInput`), and acts as that gateway of that site:

1. Good values become readings; :class:`edge_agent.batcher.ReadingBatcher` gives each a
   ``seq`` (the bridge is the first hop that sees them) and writes them in telemetry batches
   to a durable SQLite queue (:class:`edge_agent.outbox.Outbox`, ``bridge.opcua_store_path``),
   persisting each device's next seq in the same transaction.
2. Each stored batch becomes a :class:`~mesh_bridge.shell.Job` on the bridge's queue, as if it
   came from a site broker: validated, de-duplicated, partitioned and coalesced like the rest.
   At most ``max_in_flight`` are handed out at a time.
3. When its mesh messages are PUBACKed, the bridge calls :meth:`OpcUaSource.ack`, which
   deletes the batch from the queue.

So a reading is on disk from a fraction of a second after the server sent it until the cloud
broker has it: a bridge killed and restarted sends what is stored again (duplicates
downstream, de-duplicated by ``(device, seq)``; no loss). Only values the server sends while
the bridge is down, or in the last ``batch_max_delay_s`` before a kill, are not seen. At start
the source first sends a birth for its gateway with the mapped devices, so the router grants
them without a registry entry. Bad values (None, wrong type, NaN) are counted and logged by
the input, never fatal; after a server restart the input reconnects and subscribes again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_agent.batcher import ReadingBatcher
from edge_agent.opcua_input import OpcUaInput, OpcUaReading
from edge_agent.outbox import Outbox
from mesh_bridge.route import Incoming
from mesh_bridge.shell import Job
from meshwatch.config import OpcUaServerConfig
from meshwatch.contract import DeviceStatus, encode, topics

__all__ = ["OpcUaSource"]

log = logging.getLogger(__name__)

IDLE_S = 0.05


class OpcUaSource:
    """The ``[[opcua]]`` servers as one bridge source; see the module doc.

    ``put`` queues a job for the bridge (see :class:`mesh_bridge.shell.Bridge`). Thread-safe as
    the bridge uses it: :meth:`ack` runs on the bridge's worker thread, the rest on the
    source's.
    """

    def __init__(self, servers: list[OpcUaServerConfig], put: Callable[[Job], None], *,
                 site: str, gateway_id: str, store_path: Path, max_in_flight: int,
                 batch_max_readings: int = 500, batch_max_delay_s: float = 0.5) -> None:
        if not servers:
            msg = "the bridge's OPC-UA input needs at least one [[opcua]] server in the config"
            raise ValueError(msg)
        self.name = f"opcua:{site}/{gateway_id}"
        self.site, self.gateway_id = site, gateway_id
        self.devices = sorted({node.device_id for server in servers for node in server.nodes})
        self.invalid = 0
        self._servers = servers
        self._put_job = put
        self._store_path = store_path
        self._batch = (batch_max_readings, batch_max_delay_s)
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._readings: queue.SimpleQueue[OpcUaReading] = queue.SimpleQueue()
        self._inputs = [OpcUaInput(server, self._readings.put) for server in servers]
        self._taking = threading.Event()
        self._thread: threading.Thread | None = None
        self.outbox: Outbox | None = None
        self._batcher: ReadingBatcher | None = None

    def counters(self) -> dict[str, int]:
        """The inputs' counters summed, plus ``invalid`` and the queue ``depth``."""
        total: dict[str, int] = {"invalid": self.invalid,
                                 "depth": self.outbox.depth if self.outbox else 0}
        for opcua in self._inputs:
            for name, value in opcua.counters().items():
                total[name] = total.get(name, 0) + value
        return total

    def start(self) -> None:
        """Open the queue, announce the gateway, hand out what is stored, subscribe."""
        self.outbox = outbox = Outbox(self._store_path)
        max_readings, max_delay_s = self._batch
        self._batcher = batcher = ReadingBatcher(
            outbox, site=self.site, gateway_id=self.gateway_id, max_readings=max_readings,
            max_delay_s=max_delay_s)
        self._taking.set()
        self._put(None, topics.site_status(self.site, self.gateway_id), encode(DeviceStatus(
            site=self.site, gateway_id=self.gateway_id, state="birth",
            sent_ms=int(time.time() * 1000), devices=self.devices)))
        self._thread = threading.Thread(target=self._run, args=(outbox, batcher),
                                        name="bridge-opcua", daemon=True)
        self._thread.start()
        for opcua in self._inputs:
            opcua.start()

    def stop_taking(self) -> None:
        """Hand out no more jobs; readings still arriving are stored until :meth:`close`."""
        self._taking.clear()

    def close(self) -> None:
        """Unsubscribe, store the readings still in memory, close the queue."""
        self._taking.clear()
        for opcua in self._inputs:
            opcua.stop()
        if self._thread is not None:
            self._thread.join(10)
        if self._batcher is not None:
            self._take_readings()
            if not self._batcher.flush():
                log.error("%d OPC-UA readings could not be stored: the queue at %s is full",
                          self._batcher.pending, self._store_path)
        if self.outbox is not None:
            self.outbox.close()

    def ack(self, delivery: Any) -> bool:
        """A stored batch (its queue id; None for the birth) is safe in the mesh: delete it."""
        self._slots.release()
        if delivery is not None and self.outbox is not None:
            self.outbox.ack([delivery])
        return True

    def _run(self, outbox: Outbox, batcher: ReadingBatcher) -> None:
        cursor: int | None = None
        while self._taking.is_set():
            self._take_readings()
            batcher.flush_due()
            handed = 0
            for stored in outbox.peek(100, after_id=cursor, urgent=False):
                if not self._put(stored.id, stored.topic, stored.payload):
                    break
                cursor, handed = stored.id, handed + 1
            if not handed:
                time.sleep(IDLE_S)

    def _take_readings(self) -> None:
        assert self._batcher is not None
        while True:
            try:
                reading = self._readings.get_nowait()
            except queue.Empty:
                return
            try:
                self._batcher.add(reading.device_id, reading.ts_ms, {reading.metric: reading.value})
            except ValidationError as exc:
                self.invalid += 1
                log.warning("dropped OPC-UA reading of node %s: %s", reading.node_id, exc)

    def _put(self, delivery: int | None, topic: str, payload: bytes) -> bool:
        """Queue one job if a slot frees within a moment; False if not (try again later)."""
        if not self._slots.acquire(timeout=IDLE_S):
            return False
        incoming = Incoming(topic, payload, int(time.time() * 1000), source_broker=self.name)
        self._put_job(Job(incoming, delivery, self))
        return True
