"""Routing in worker processes: the bridge's CPU-heavy step, off the process that does the I/O.

Decoding, validating, de-duplicating and re-encoding cost a few µs per reading, all under
Python's GIL. Done on the bridge's I/O thread, they starve paho's network threads and leave the
second core idle. A :class:`RouterPool` runs ``processes`` router processes instead: each owns
a :class:`~mesh_bridge.route.Router` and a :class:`~mesh_bridge.coalesce.Coalescer`, built from a
:class:`RouterSpec`, and the I/O process only moves bytes.

- **Sharding.** A site message goes to shard ``crc32(site/gateway) % processes``, taken from its
  topic (``mw/v1/site/{site}/gw/{gateway}/...``). A gateway's births, telemetry and dead letters
  all meet the same router, and a device's readings come through its gateway, so identity and
  de-duplication state stay exact. Topics of another shape all go to shard 0.
- **Protocol.** The I/O process sends ``("route", [(job_id, Incoming), ...])`` and
  ``("flush", None)``; a router answers with a :class:`RoutingResult`: per job its counts and
  ready messages (dead letters) and how many partition batches it handed to its coalescer,
  plus the mesh messages closed since (their owners are job ids). A router closes open batches
  by itself after ``linger_s``.
- **Failure.** A router that dies is reported as :class:`RouterFailed` through ``put``; the
  bridge then stops with an error (unacknowledged site messages come again to the next
  process).

>>> from mesh_bridge.route import Incoming
>>> from meshwatch.contract import Reading, TelemetryBatch, DeviceStatus, encode, topics
>>> from meshwatch.registry import Registry
>>> T0 = 1767225600000
>>> router = RouterSpec(Registry([]), partitions=2, linger_s=0.0).build()
>>> birth = DeviceStatus(site="s1", gateway_id="gw-1", state="birth", sent_ms=T0, devices=["m1"])
>>> batch = TelemetryBatch(site="s1", gateway_id="gw-1", sent_ms=T0, readings=[
...     Reading(device_id="m1", ts_ms=T0, seq=1, metrics={"flow_lpm": 1.0})])
>>> router.route([(1, Incoming(topics.site_status("s1", "gw-1"), encode(birth), T0)),
...               (2, Incoming(topics.site_telemetry("s1", "gw-1"), encode(batch), T0))])
>>> result = router.result(flush=True)
>>> [(job.job_id, job.parts) for job in result.jobs], [m.owners for m in result.mesh]
([(1, 0), (2, 1)], [[2]])
>>> shard_of(topics.site_telemetry("s1", "gw-1"), 1), shard_of("not/a/site/topic", 4)
(0, 0)
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from mesh_bridge.coalesce import DEFAULT_MAX_READINGS, Coalescer, MeshMessage
from mesh_bridge.identity import Identity
from mesh_bridge.ledger import Counts
from mesh_bridge.route import DEFAULT_LATE_HORIZON_MS, Incoming, Message, Router
from meshwatch.registry import Registry

__all__ = ["RoutedJob", "RouterFailed", "RouterPool", "RouterSpec", "RoutingResult", "shard_of"]

log = logging.getLogger(__name__)

Batch = list[tuple[int, Incoming]]


def shard_of(topic: str, shards: int) -> int:
    """The router shard of a site topic: by its site and gateway levels."""
    levels = topic.split("/", 6)
    if shards == 1 or len(levels) < 6 or levels[2] != "site":
        return 0
    return zlib.crc32(f"{levels[3]}/{levels[5]}".encode()) % shards


@dataclass(frozen=True, slots=True)
class RoutedJob:
    """What routing one site message gave: counts, ready messages, partition batches taken."""

    job_id: int
    counts: Counts
    lag_ms: int | None
    messages: list[Message]
    parts: int


@dataclass(frozen=True, slots=True)
class RoutingResult:
    """A router's answer: jobs routed, and the mesh messages closed since its last answer."""

    jobs: list[RoutedJob]
    mesh: list[MeshMessage[int]]


@dataclass(frozen=True, slots=True)
class RouterFailed:
    """A router process died; the bridge must stop."""

    shard: int
    why: str


@dataclass(frozen=True)
class RouterSpec:
    """The picklable recipe of one router: what every router process builds at start."""

    registry: Registry
    partitions: int
    late_horizon_ms: int = DEFAULT_LATE_HORIZON_MS
    mesh_batch_readings: int = DEFAULT_MAX_READINGS
    linger_s: float = 0.05

    def build(self) -> ShardRouter:
        """A router with its coalescer, for this process."""
        router = Router(Identity(self.registry), partitions=self.partitions,
                        late_horizon_ms=self.late_horizon_ms)
        return ShardRouter(router, Coalescer(self.partitions, self.mesh_batch_readings),
                           self.linger_s)


@dataclass(slots=True)
class ShardRouter:
    """A router and its coalescer, as run in one router process (see the module doc)."""

    router: Router
    coalescer: Coalescer[int]
    linger_s: float
    _jobs: list[RoutedJob] = field(default_factory=list)
    _mesh: list[MeshMessage[int]] = field(default_factory=list)
    _opened_at: float | None = None

    def route(self, batch: Batch) -> None:
        """Route site messages; their outputs wait for :meth:`result`."""
        for job_id, incoming in batch:
            routed = self.router.route(incoming)
            self._jobs.append(RoutedJob(job_id, routed.counts, routed.lag_ms, routed.messages,
                                        len(routed.batches)))
            if routed.batches:
                if self._opened_at is None:
                    self._opened_at = time.monotonic()
                self._mesh += self.coalescer.add(job_id, routed.batches)

    def wait_s(self) -> float | None:
        """How long until open batches are due (None: nothing open)."""
        if self._opened_at is None:
            return None
        return max(0.0, self._opened_at + self.linger_s - time.monotonic())

    def result(self, *, flush: bool = False) -> RoutingResult:
        """What is ready, closing open batches if ``flush`` or they lingered long enough."""
        if flush or self.wait_s() == 0.0:
            self._mesh += self.coalescer.flush()
        if not len(self.coalescer):
            self._opened_at = None
        result = RoutingResult(self._jobs, self._mesh)
        self._jobs, self._mesh = [], []
        return result


def _serve(spec: RouterSpec, conn: Connection) -> None:
    """A router process: route what comes, answer with results, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it stops us
    shard = spec.build()
    while True:
        if conn.poll(shard.wait_s()):
            command, batch = conn.recv()
            if command == "stop":
                return
            if command == "route":
                shard.route(batch)
            flush = command == "flush"
        else:
            flush = False
        result = shard.result(flush=flush)
        if result.jobs or result.mesh:
            conn.send(result)


class RouterPool:
    """``processes`` router processes and the threads that read their answers into ``put``."""

    def __init__(self, spec: RouterSpec, processes: int,
                 put: Callable[[RoutingResult | RouterFailed], None]) -> None:
        if processes < 1:
            msg = f"routing needs at least 1 process, got {processes}"
            raise ValueError(msg)
        self.spec = spec
        self.processes = processes
        self._put = put
        self._conns: list[Connection] = []
        self._workers: list[Any] = []
        self._readers: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        """Start the router processes (spawned: no threads or sockets are inherited)."""
        context = multiprocessing.get_context("spawn")
        for shard in range(self.processes):
            ours, theirs = context.Pipe()
            worker = context.Process(target=_serve, args=(self.spec, theirs),
                                     name=f"bridge-router-{shard}", daemon=True)
            worker.start()
            theirs.close()
            reader = threading.Thread(target=self._read, args=(shard, ours),
                                      name=f"bridge-router-{shard}-reader", daemon=True)
            reader.start()
            self._conns.append(ours)
            self._workers.append(worker)
            self._readers.append(reader)

    def route(self, jobs: Batch) -> None:
        """Send site messages to their shards."""
        by_shard: dict[int, Batch] = {}
        for job in jobs:
            by_shard.setdefault(shard_of(job[1].topic, self.processes), []).append(job)
        for shard, batch in by_shard.items():
            self._conns[shard].send(("route", batch))

    def flush(self) -> None:
        """Ask every router to close its open batches now."""
        for conn in self._conns:
            conn.send(("flush", None))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the routers and their readers."""
        self._stopping = True
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(("stop", None))
        for worker in self._workers:
            worker.join(timeout_s)
            if worker.is_alive():
                worker.kill()
        for reader in self._readers:
            reader.join(timeout_s)

    def _read(self, shard: int, conn: Connection) -> None:
        while True:
            try:
                result = conn.recv()
            except (EOFError, OSError) as exc:
                if not self._stopping:
                    why = f"router process {shard} died ({type(exc).__name__})"
                    log.error("%s; the bridge stops", why)
                    self._put(RouterFailed(shard, why))
                return
            self._put(result)
