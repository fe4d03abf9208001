"""InfluxDB v2 write API sink (InfluxDB 2, or VictoriaMetrics' ``/api/v2/write``).

:class:`InfluxSink` is a bytewax ``FixedPartitionedSink``: one sink partition per mesh
partition (``p000``, ``p001``...), items routed by shard (a shard lies in one partition), so
each worker writes the devices of the partitions it owns.

**Points** are identified by measurement, tags and event time, so a replay after a crash
overwrites what it wrote before:

- ``mw_telemetry,device=D,imputed=false|true <metric>=<value>,... <ts_ms>``: every released
  reading (late ones too); imputed readings carry ``imputed=true``.
- ``mw_silence,device=D missed=Ni,last_seen_ms=Ni,resumed=0|1i <ts_ms>``: silence records.
- ``mw_score,device=D score=<0..1> <ts_ms>``: the detection stage's score of each reading it
  scored (a customer meter's highest, an inlet's burst score), with ``flow.write_scores``.
- ``mw_edge_score,device=D,model=M,model_version=V score=<0..1>,window_start_ms=Ni
  <window_end_ms>``: edge models' scores (from ``mw/v1/mesh/scores/{n}``), beside ``mw_score``.
- ``mw_alert,device=D,district=X,kind=K,severity=S,status=open|update|cleared
  alert_id="…",active=1i|0i,score=…,est_loss_lph=…,first_ts_ms=Ni,last_ts_ms=Ni <last_ts_ms>``:
  every alert message of the detection stage (the schema of ``meshwatch/contract/measurements.py``:
  ``device`` absent for district alerts, ``est_loss_lph`` 0 when cleared or unknown).
- ``mw_flow,shard=S <counter>=Ni,... <wall ms>``: a shard's cumulative counters (pipeline
  stats, wall-clock stamped: the newest sample is the current value).
- ``mw_ledger,hop=flow,instance=shard-S received=Ni,forwarded=Ni,duplicates=Ni,
  dead_letters=0i,dropped=0i <wall ms>``: the same counters as the loss ledger's flow hop
  (``forwarded``: stored, in order or late; readings waiting for the watermark are in neither).
- ``mw_detect,district=X <counter>=Ni,...,watermark_ms=Ni <wall ms>``: a district's detection
  counters (:data:`dataflows.detection.COUNTERS`), stamped the same way.
- ``mw_district,district=X inlet_flow_lpm=…,customer_flow_lpm=…,balance_lpm=…,pressure_bar=…
  <interval start ms>``: the water balance the district leak detector saw, per 15 minutes of
  event time (:meth:`dataflows.detection.DistrictState.drain_balance`; a value not known is
  left out).

VictoriaMetrics names them ``<measurement>_<field>`` (``mw_telemetry_flow_lpm``).

**Writes** are synchronous, ``batch_size`` lines per request, through
:class:`meshwatch.tsdb.LineWriter`. A request that fails for a reason that may pass
(connection refused or reset, timeout, 5xx, 429, 401/403/404 while an operator fixes the
token or bucket) is retried with capped back-off, forever: the bytewax worker waits in
``write_batch``, no epoch completes, no message is acknowledged to the broker, and the broker
holds the rest. Nothing is dropped.
A request refused as malformed (400, 422) will never pass: it is logged with the server's
answer and counted in ``rejected`` (it would be a bug in this module; points are built from
validated readings).

>>> line_of_point(Point("m1", 1767225600000, 4, {"flow_lpm": 1.5}, Kind.MEASURED))
'mw_telemetry,device=m1,imputed=false flow_lpm=1.5 1767225600000'
>>> line_of_point(Point("m1", 1767225660000, -1, {"flow_lpm": 2.0}, Kind.IMPUTED))
'mw_telemetry,device=m1,imputed=true flow_lpm=2.0 1767225660000'
>>> line_of_alert(Alert(alert_id="al-1", district="dma-01", kind="burst", severity="critical",
...     score=0.97, first_ts_ms=1767225600000, last_ts_ms=1767225660000,
...     model_version="water-1.0"))  # doctest: +NORMALIZE_WHITESPACE
'mw_alert,district=dma-01,kind=burst,severity=critical,status=open alert_id="al-1",active=1i,\
score=0.97,est_loss_lph=0.0,first_ts_ms=1767225600000i,last_ts_ms=1767225660000i 1767225660000'
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from dataflows.ordering import DeviceSilent, Kind, Point
from dataflows.records import BalanceRow, DistrictOutput, ShardOutput
from meshwatch.contract.events import Alert, AlertStatus, EdgeScore
from meshwatch.contract.measurements import DISTRICT, LEDGER
from meshwatch.tsdb import LineWriter

__all__ = ["InfluxSettings", "InfluxSink", "line_of_alert", "line_of_point", "lines_of",
           "sink_part_name"]

TELEMETRY = "mw_telemetry"
SILENCE = "mw_silence"
STATS = "mw_flow"
SCORE = "mw_score"
EDGE_SCORE = "mw_edge_score"
ALERT = "mw_alert"
DETECT = "mw_detect"


def sink_part_name(partition: int) -> str:
    """Sink partition names sort like their numbers (bytewax indexes the sorted names).

    >>> [sink_part_name(p) for p in (0, 12)]
    ['p000', 'p012']
    """
    return f"p{partition:03d}"


def line_of_point(point: Point) -> str:
    """One ``mw_telemetry`` line (ids and metric names need no escaping: see the contract)."""
    imputed = "true" if point.kind is Kind.IMPUTED else "false"
    fields = ",".join([f"{name}={value!r}" for name, value in point.metrics.items()])
    return f"{TELEMETRY},device={point[0]},imputed={imputed} {fields} {point[1]}"


def _line_of_silence(s: DeviceSilent) -> str:
    return (f"{SILENCE},device={s.device_id} missed={s.missed}i,last_seen_ms={s.last_seen_ms}i,"
            f"resumed={0 if s.resumed_ms is None else 1}i {s.ts_ms}")


def _line_of_balance(district: str, row: BalanceRow) -> str:
    fields = {name: getattr(row, name) for name in DISTRICT.fields}
    return DISTRICT.line({"district": district},
                         {k: v for k, v in fields.items() if v is not None}, row.start_ms)


def line_of_alert(alert: Alert) -> str:
    """One ``mw_alert`` line (ids, kinds and statuses need no escaping: see the contract)."""
    device = "" if alert.device_id is None else f",device={alert.device_id}"
    district = "" if alert.district is None else f",district={alert.district}"
    cleared = alert.status is AlertStatus.CLEARED
    loss = 0.0 if cleared or alert.est_loss_lph is None else alert.est_loss_lph
    active = 0 if cleared else 1
    return (f"{ALERT}{device}{district},kind={alert.kind.value},severity={alert.severity.value},"
            f"status={alert.status.value} alert_id=\"{alert.alert_id}\",active={active}i,"
            f"score={alert.score!r},est_loss_lph={loss!r},first_ts_ms={alert.first_ts_ms}i,"
            f"last_ts_ms={alert.last_ts_ms}i {alert.last_ts_ms}")


def lines_of_scores(scores: EdgeScore) -> list[str]:
    """``mw_edge_score`` lines of an edge model's windows (ids need no escaping).

    >>> lines = lines_of_scores(EdgeScore(site="s1", gateway_id="gw-1", model_id="rf",
    ...     model_version="3", windows=[{"device_id": "m1", "window_start_ms": 1767225600000,
    ...     "window_end_ms": 1767229200000, "score": 0.25}]))
    >>> lines[0].split(" ")  # doctest: +NORMALIZE_WHITESPACE
    ['mw_edge_score,device=m1,model=rf,model_version=3',
     'score=0.25,window_start_ms=1767225600000i', '1767229200000']
    """
    tags = f"model={scores.model_id},model_version={scores.model_version}"
    return [f"{EDGE_SCORE},device={w.device_id},{tags} score={w.score!r},"
            f"window_start_ms={w.window_start_ms}i {w.window_end_ms}" for w in scores.windows]


def lines_of(item: ShardOutput | DistrictOutput | EdgeScore) -> list[str]:
    """Every line of one output.

    A shard's: points, silences, then its counters; a district's: alerts, scores, then its
    counters; an edge model's: its windows' scores.
    """
    if isinstance(item, EdgeScore):
        return lines_of_scores(item)
    if isinstance(item, DistrictOutput):
        lines = [line_of_alert(alert) for alert in item.alerts]
        lines += [f"{SCORE},device={device} score={score!r} {ts}"
                  for device, ts, score in item.scores]
        counters = ",".join(f"{name}={value}i" for name, value in item.counts.items())
        if item.watermark is not None:
            counters += f",watermark_ms={item.watermark}i"
        lines.append(f"{DETECT},district={item.district} {counters} {item.stats_ms}")
        lines += [_line_of_balance(item.district, row) for row in item.balance]
        return lines
    lines = [line_of_point(p) for p in item.released.points]
    lines += [_line_of_silence(s) for s in item.released.silences]
    counts = item.counts
    counters = ",".join(f"{name}={value}i" for name, value in counts.items())
    lines.append(f"{STATS},shard={item.shard} {counters} {item.stats_ms}")
    lines.append(LEDGER.line(  # stored: in order or on the late path; the rest still waits
        {"hop": "flow", "instance": f"shard-{item.shard}"},
        {"received": counts.get("received", 0),
         "forwarded": counts.get("measured", 0) + counts.get("late", 0),
         "duplicates": counts.get("duplicates", 0), "dead_letters": 0, "dropped": 0},
        item.stats_ms))
    return lines


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    """Where and how to write."""

    url: str
    token: str
    org: str
    bucket: str
    partitions: int
    batch_size: int = 5000
    timeout_s: float = 10.0
    retry_max_s: float = 10.0


@dataclass(slots=True)
class InfluxSinkState:
    """A sink partition's counters, snapshotted with the epoch."""

    lines: int = 0
    requests: int = 0
    retries: int = 0
    rejected: int = 0


class _InfluxPartition(StatefulSinkPartition[ShardOutput | DistrictOutput | EdgeScore,
                                             InfluxSinkState]):
    def __init__(self, settings: InfluxSettings, name: str,
                 resume: InfluxSinkState | None) -> None:
        self.settings = settings
        self.name = name
        self._writer = LineWriter(settings.url, token=settings.token, org=settings.org,
                                  bucket=settings.bucket, timeout_s=settings.timeout_s,
                                  retry_max_s=settings.retry_max_s, what="lines (the flow waits)")
        if resume is not None:
            w = self._writer
            w.lines, w.requests, w.retries, w.rejected = (
                resume.lines, resume.requests, resume.retries, resume.rejected)

    def write_batch(self, values: list[ShardOutput | DistrictOutput | EdgeScore]) -> None:
        lines = [line for item in values for line in lines_of(item)]
        size = self.settings.batch_size
        for start in range(0, len(lines), size):
            self._writer.write(lines[start:start + size])  # refused lines: counted, logged

    def snapshot(self) -> InfluxSinkState:
        w = self._writer
        return InfluxSinkState(w.lines, w.requests, w.retries, w.rejected)

    def close(self) -> None:
        self._writer.close()


class InfluxSink(FixedPartitionedSink[ShardOutput | DistrictOutput | EdgeScore,
                                      InfluxSinkState]):
    """Writes shard, district and edge-score outputs (keyed by shard, district, partition)."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings

    def list_parts(self) -> list[str]:
        """One sink partition per mesh partition."""
        return [sink_part_name(p) for p in range(self.settings.partitions)]

    def part_fn(self, item_key: str) -> int:
        """Where an item goes: a shard's to its mesh partition, a district's by CRC-32."""
        if item_key.isdigit():
            return int(item_key) % self.settings.partitions
        return zlib.crc32(item_key.encode()) % self.settings.partitions

    def build_part(self, step_id: str, for_part: str,
                   resume_state: InfluxSinkState | None) -> _InfluxPartition:
        """A writer for one sink partition."""
        return _InfluxPartition(self.settings, for_part, resume_state)

