"""Pipeline statistics for the dashboards: the bridge's ledger and its gateways', as InfluxDB lines.

The bridge is where edge heartbeats meet the cloud, so it writes what the *pipeline health*
dashboard reads about both hops (schemas in :mod:`meshwatch.contract.measurements`), every
``bridge.stats_s`` seconds while ``[influxdb] url`` is set, stamped with the wall clock:

- ``mw_bridge,bridge=ID``: cumulative ``messages_in``, ``readings_in``, ``readings_forwarded``,
  ``duplicates``, ``late``; gauges ``in_flight``, ``cloud_connected`` and ``lag_p95_s``
  (receive time - ``sent_ms``, 95th percentile of the messages since the previous line).
- ``mw_dead_letters,component=bridge,instance=ID,reason=R``: dead letters the bridge published,
  by reason (its own refusals, and the gateways' own dead letters that it forwards).
- ``mw_ledger,hop=bridge,instance=ID``: readings ``received``, ``forwarded``, ``duplicates``,
  ``dead_letters``, ``dropped`` (always 0: the bridge drops nothing).
- Per gateway, from the counters of its newest heartbeat (``DeviceStatus``, validated by the
  router): ``mw_edge,site=S,gateway=G`` (outbox and link) and ``mw_ledger,hop=edge,instance=G``
  (readings ``received``, ``dead_letters``, ``dropped``). A gateway's line keeps the time of
  its heartbeat, so a silent gateway's newest point grows old instead of looking current.

Counters are cumulative since the process started (a restart starts again from 0, as with
Prometheus; panels take ``non_negative_difference``), so a snapshot that could not be written
is superseded by the next: :class:`StatsWriter` only ever writes the newest one, and never
holds up the bridge.

>>> stats = PipelineStats("mw-bridge")
>>> stats.routed(Counts(messages_in=1, readings_in=3, forwarded=2, duplicates=1), lag_ms=250)
>>> stats.gateway(DeviceStatus(site="s1", gateway_id="gw-1", state="heartbeat",
...     sent_ms=1767225600000, counters={"readings_in": 3, "queue_depth": 2, "oldest_age_s": 4}))
>>> for line in stats.lines(1767225605000, in_flight=0, cloud_connected=True): print(line)
mw_bridge,bridge=mw-bridge messages_in=1i,readings_in=3i,readings_forwarded=2i,duplicates=1i,\
late=0i,in_flight=0i,cloud_connected=1i,lag_p95_s=0.25 1767225605000
mw_ledger,hop=bridge,instance=mw-bridge received=3i,forwarded=2i,duplicates=1i,dead_letters=0i,\
dropped=0i 1767225605000
mw_edge,gateway=gw-1,site=s1 queue_depth=2i,oldest_queued_age_s=4.0,readings_in=3i 1767225600000
mw_ledger,hop=edge,instance=gw-1 received=3i 1767225600000
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mesh_bridge.ledger import Counts
from meshwatch.contract.events import DeviceStatus
from meshwatch.contract.measurements import BRIDGE, DEAD_LETTERS, EDGE, LEDGER
from meshwatch.tsdb import LineWriter, Stopping

__all__ = ["PipelineStats", "StatsWriter"]

log = logging.getLogger(__name__)

EDGE_FIELDS = {"queue_depth": "queue_depth", "queue_bytes": "queue_bytes",
               "oldest_age_s": "oldest_queued_age_s", "in_flight": "in_flight",
               "connected": "connected", "readings_in": "readings_in", "acked": "acked",
               "readings_dropped": "readings_dropped"}
"""Heartbeat counter (``edge_agent`` stats) -> ``mw_edge`` field."""
EDGE_LEDGER = {"readings_in": "received", "dead_letters": "dead_letters",
               "readings_dropped": "dropped"}
"""Heartbeat counter -> ``mw_ledger`` field of the edge hop."""


class PipelineStats:
    """Running totals of the bridge and the newest heartbeat of each gateway (thread-safe)."""

    def __init__(self, bridge_id: str) -> None:
        self.bridge_id = bridge_id
        self._lock = threading.Lock()
        self._totals = Counts()
        self._lags_ms: list[int] = []
        self._gateways: dict[tuple[str, str], DeviceStatus] = {}

    def routed(self, counts: Counts, lag_ms: int | None) -> None:
        """Count one routed site message."""
        with self._lock:
            self._totals.add(counts)
            if lag_ms is not None:
                self._lags_ms.append(max(0, lag_ms))

    def gateway(self, status: DeviceStatus) -> None:
        """Keep ``status`` if it is a gateway's newest heartbeat."""
        if not status.counters:
            return  # births and deaths carry none
        key = (status.site, status.gateway_id)
        with self._lock:
            known = self._gateways.get(key)
            if known is None or known.sent_ms <= status.sent_ms:
                self._gateways[key] = status

    def lines(self, now_ms: int, *, in_flight: int, cloud_connected: bool) -> list[str]:
        """The lines of one snapshot (the lag percentile starts again after it)."""
        with self._lock:
            t = Counts()
            t.add(self._totals)
            lags, self._lags_ms = sorted(self._lags_ms), []
            gateways = list(self._gateways.values())
        bridge = {"bridge": self.bridge_id}
        fields: dict[str, object] = {
            "messages_in": t.messages_in, "readings_in": t.readings_in,
            "readings_forwarded": t.forwarded, "duplicates": t.duplicates, "late": t.late,
            "in_flight": in_flight, "cloud_connected": int(cloud_connected)}
        if lags:
            fields["lag_p95_s"] = lags[min(len(lags) - 1, int(0.95 * len(lags)))] / 1000
        lines = [BRIDGE.line(bridge, fields, now_ms)]
        instance = {"component": "bridge", "instance": self.bridge_id}
        lines += [DEAD_LETTERS.line(instance | {"reason": reason}, {"count": n}, now_ms)
                  for reason, n in sorted(t.dead_letters.items())]
        lines.append(LEDGER.line(
            {"hop": "bridge", "instance": self.bridge_id},
            {"received": t.readings_in, "forwarded": t.forwarded, "duplicates": t.duplicates,
             "dead_letters": t.dead_lettered, "dropped": 0}, now_ms))
        for status in sorted(gateways, key=lambda s: (s.site, s.gateway_id)):
            lines += _gateway_lines(status)
        return lines


def _gateway_lines(status: DeviceStatus) -> list[str]:
    counters = status.counters
    edge: dict[str, object] = {field: counters[key] for key, field in EDGE_FIELDS.items()
                               if key in counters}
    if "oldest_queued_age_s" in edge:
        edge["oldest_queued_age_s"] = float(counters["oldest_age_s"])
    ledger: dict[str, object] = {field: counters[key] for key, field in EDGE_LEDGER.items()
                                 if key in counters}
    lines = []
    if edge:
        lines.append(EDGE.line({"site": status.site, "gateway": status.gateway_id}, edge,
                               status.sent_ms))
    if ledger:
        lines.append(LEDGER.line({"hop": "edge", "instance": status.gateway_id}, ledger,
                                 status.sent_ms))
    return lines


class StatsWriter:
    """A daemon thread writing :meth:`PipelineStats.lines` every ``interval_s`` seconds.

    ``gauges`` returns ``(in_flight, cloud_connected)`` at snapshot time. While the TSDB is
    unreachable the writer retries its snapshot with back-off; when it lands, the next
    snapshot is taken fresh (older ones are superseded: every counter is cumulative).
    """

    def __init__(self, stats: PipelineStats, writer: LineWriter, interval_s: float,
                 gauges: Callable[[], tuple[int, bool]]) -> None:
        self.stats = stats
        self.writer = writer
        self.interval_s = interval_s
        self.gauges = gauges
        self.snapshots = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bridge-stats", daemon=True)

    def start(self) -> StatsWriter:
        """Start writing."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write a last snapshot (one attempt, up to ``timeout_s``), then stop."""
        self._stop.set()
        self._thread.join(timeout_s)
        self.writer.close()

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval_s)
            in_flight, connected = self.gauges()
            lines = self.stats.lines(int(time.time() * 1000), in_flight=in_flight,
                                     cloud_connected=connected)
            try:  # once stopping, a single attempt: Stopping comes at the first failure
                if self.writer.write(lines, stop=self._stop) is None:
                    self.snapshots += 1
            except Stopping:
                if not stopping:
                    continue  # stop() came while retrying: one last, fresh snapshot
            if stopping:
                return
