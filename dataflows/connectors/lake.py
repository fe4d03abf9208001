"""The data lake: measured readings as Parquet files, partitioned by event date.

:class:`LakeSink` is a bytewax ``FixedPartitionedSink`` with one sink partition per mesh
partition (like :class:`~dataflows.connectors.influx.InfluxSink`). It keeps every reading
that was measured (in order or late, never imputed ones), one row each, after
de-duplication, so the lake is also the flow's ledger: each ``(device_id, seq)`` once.

Layout: ``{root}/date=YYYY-MM-DD/{partition}-{n:010d}.parquet`` (Hive style, readable with
``pyarrow.dataset.dataset(root, partitioning="hive")``). Columns: ``device_id`` (string),
``ts`` (timestamp[ms, UTC]), ``seq`` (int64), ``late`` (bool), ``quality`` (string,
comma-separated flags), ``metrics`` (map<string, double>).

**Exactly once.** Rows are buffered during an epoch and written when bytewax snapshots the
partition, as file number ``n`` (one per date present), written to a temporary name and
renamed. The snapshot is ``n + 1``. If the process dies before the epoch is committed, the
restart resumes at ``n`` and first deletes this partition's files numbered ``n`` or more:
they hold an epoch that is replayed. Without a resume state (a first start, or no recovery
directory) numbering continues after the highest file present and nothing is deleted.

>>> import tempfile
>>> from dataflows.ordering import Kind, Point, Released
>>> from dataflows.records import ShardOutput
>>> root = Path(tempfile.mkdtemp())
>>> part = LakeSink(root, partitions=1).build_part("lake", "p000", None)
>>> part.write_batch([ShardOutput(0, Released([Point("m1", 1767225600000, 7,
...     {"flow_lpm": 1.5}, Kind.MEASURED)]), {}, 0)])
>>> part.snapshot()
1
>>> read_lake(root).column("seq").to_pylist(), sorted(p.name for p in root.rglob("*.parquet"))
([7], ['p000-0000000000.parquet'])
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from dataflows.connectors.influx import sink_part_name
from dataflows.ordering import Kind
from dataflows.records import ShardOutput

__all__ = ["SCHEMA", "LakeSink", "read_lake"]

SCHEMA = pa.schema([
    ("device_id", pa.string()),
    ("ts", pa.timestamp("ms", tz="UTC")),
    ("seq", pa.int64()),
    ("late", pa.bool_()),
    ("quality", pa.string()),
    ("metrics", pa.map_(pa.string(), pa.float64())),
])
_FILE = re.compile(r"^(?P<part>p\d+)-(?P<n>\d{10})\.parquet$")
_DAY_MS = 86_400_000


def read_lake(root: Path) -> pa.Table:
    """Every row of the lake at ``root`` (with its ``date`` partition column)."""
    return ds.dataset(root, format="parquet", partitioning="hive").to_table()


class _Rows:
    def __init__(self) -> None:
        self.device_id: list[str] = []
        self.ts: list[int] = []
        self.seq: list[int] = []
        self.late: list[bool] = []
        self.quality: list[str] = []
        self.metrics: list[list[tuple[str, float]]] = []

    def __len__(self) -> int:
        return len(self.ts)

    def table(self) -> pa.Table:
        return pa.Table.from_arrays([
            pa.array(self.device_id, pa.string()),
            pa.array(self.ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            pa.array(self.seq, pa.int64()),
            pa.array(self.late, pa.bool_()),
            pa.array(self.quality, pa.string()),
            pa.array(self.metrics, pa.map_(pa.string(), pa.float64())),
        ], schema=SCHEMA)


class _LakePartition(StatefulSinkPartition[ShardOutput, int]):
    def __init__(self, root: Path, name: str, resume: int | None) -> None:
        self.root = root
        self.name = name
        mine = self._files()
        if resume is None:
            self.next = max((n for n, _ in mine), default=-1) + 1
        else:
            self.next = resume
            for n, path in mine:
                if n >= resume:  # written by an epoch that never committed: it is replayed
                    path.unlink()
        self._days: dict[int, _Rows] = {}

    def _files(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.root.glob("date=*/*.parquet"):
            match = _FILE.match(path.name)
            if match and match["part"] == self.name:
                found.append((int(match["n"]), path))
        return found

    def write_batch(self, values: list[ShardOutput]) -> None:
        days = self._days
        for item in values:
            for point in item.released.points:
                if point.kind is Kind.IMPUTED:
                    continue
                day = point.ts_ms // _DAY_MS
                rows = days.get(day)
                if rows is None:
                    rows = days[day] = _Rows()
                rows.device_id.append(point.device_id)
                rows.ts.append(point.ts_ms)
                rows.seq.append(point.seq)
                rows.late.append(point.kind is Kind.LATE)
                rows.quality.append(",".join(point.quality))
                rows.metrics.append(list(point.metrics.items()))

    def snapshot(self) -> int:
        if self._days:
            n = self.next
            for day, rows in sorted(self._days.items()):
                date = datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()
                folder = self.root / f"date={date}"
                folder.mkdir(parents=True, exist_ok=True)
                final = folder / f"{self.name}-{n:010d}.parquet"
                temporary = folder / f".{final.name}.tmp"
                pq.write_table(rows.table(), temporary)
                os.replace(temporary, final)
            self._days = {}
            self.next = n + 1
        return self.next


class LakeSink(FixedPartitionedSink[ShardOutput, int]):
    """Parquet files of measured readings under ``root``; see the module doc."""

    def __init__(self, root: Path, partitions: int) -> None:
        self.root = Path(root)
        self.partitions = partitions

    def list_parts(self) -> list[str]:
        """One sink partition per mesh partition."""
        return [sink_part_name(p) for p in range(self.partitions)]

    def part_fn(self, item_key: str) -> int:
        """A shard's items go to its mesh partition (``shard % partitions``)."""
        return int(item_key) % self.partitions

    def build_part(self, step_id: str, for_part: str,
                   resume_state: int | None) -> _LakePartition:
        """A writer for one sink partition, resumed at its file number."""
        self.root.mkdir(parents=True, exist_ok=True)
        return _LakePartition(self.root, for_part, resume_state)
