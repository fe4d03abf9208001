"""Files of a simulated run: readings by delivery day, ground truth, comm faults, registry.

Layout under the output directory::

    registry.csv                      one row per device
    readings/date=YYYY-MM-DD/<kind>.parquet (or .csv)
                                      readings delivered that day (UTC), by device kind
    ground_truth.csv                  incidents, written as they end
    confounders.csv                   legitimate look-alikes (watering, pools, night shifts)
    comm_faults.csv                   every reading a communication fault touched
    run.json                          the configuration and the run's counters

Readings are partitioned by the day they were *delivered* (``sent_ms``): late readings
land in a later day's files. Writing streams: rows are buffered per device kind up to
``row_group_rows`` and a day's files are closed as soon as delivery moves past that day.
The same seed gives byte-identical files.

>>> import tempfile
>>> from pathlib import Path
>>> from simulators.config import FleetConfig, SimConfig
>>> with tempfile.TemporaryDirectory() as out:
...     stats = write_run(SimConfig(fleet=FleetConfig(meters=50), days=0.1), Path(out))
...     sorted(p.name for p in Path(out).iterdir())
['comm_faults.csv', 'confounders.csv', 'ground_truth.csv', 'readings', 'registry.csv', 'run.json']
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from simulators.block import ReadingBlock
from simulators.comms import CommFault, CommFaultLog
from simulators.config import SimConfig
from simulators.engine import FleetSimulator, RunStats
from simulators.fleet import CUSTOMER_TYPE_NAMES, KIND_NAMES, DeviceKind, Fleet
from simulators.truth import Episode

Format = Literal["parquet", "csv"]
FORMATS: tuple[Format, ...] = ("parquet", "csv")
MS_PER_DAY = 86_400_000
EPISODE_COLUMNS = ["device_id", "district", "kind", "start_ms", "end_ms", "start", "end",
                   "magnitude", "unit", "detail"]


class ReadingsWriter:
    """Streams reading blocks into one file per delivery day and device kind."""

    def __init__(self, out_dir: Path, fleet: Fleet, fmt: Format = "parquet",
                 row_group_rows: int = 262_144) -> None:
        if fmt not in FORMATS:
            msg = f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}"
            raise ValueError(msg)
        self._dir, self._fmt, self._rows_per_group = out_dir / "readings", fmt, row_group_rows
        self._ids = pa.array(fleet.device_ids.tolist(), pa.string())
        self._gateways = pa.array(fleet.gateway_ids.tolist(), pa.string())
        self._gateway_of = fleet.gateway_of
        self._day: int | None = None
        self._day_folder = self._dir
        self._buffers: dict[str, list[ReadingBlock]] = {}
        self._buffered: dict[str, int] = {}
        self._writers: dict[str, pq.ParquetWriter | pa_csv.CSVWriter] = {}

    def add(self, block: ReadingBlock) -> None:
        """Buffer one block; blocks must come in delivery order."""
        day = block.sent_ms // MS_PER_DAY
        if day != self._day:
            self._close_day()
            self._day = day
            date = datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()
            self._day_folder = self._dir / f"date={date}"
        self._buffers.setdefault(block.kind, []).append(block)
        self._buffered[block.kind] = self._buffered.get(block.kind, 0) + len(block)
        if self._buffered[block.kind] >= self._rows_per_group:
            self._flush(block.kind)

    def close(self) -> None:
        """Write what is buffered and close every file."""
        self._close_day()

    def _close_day(self) -> None:
        for kind in list(self._buffers):
            self._flush(kind)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def _flush(self, kind: str) -> None:
        blocks = self._buffers.pop(kind, [])
        self._buffered[kind] = 0
        if not blocks:
            return
        index = np.concatenate([b.device_index for b in blocks])
        columns: dict[str, pa.Array] = {
            "device_id": self._ids.take(pa.array(index)),
            "ts_ms": pa.array(np.concatenate([b.ts_ms for b in blocks])),
            "seq": pa.array(np.concatenate([b.seq for b in blocks])),
            "sent_ms": pa.array(np.repeat([b.sent_ms for b in blocks],
                                          [len(b) for b in blocks]).astype(np.int64)),
            "gateway_id": self._gateways.take(pa.array(self._gateway_of[index])),
        }
        for name in blocks[0].metrics:
            columns[name] = pa.array(np.concatenate([b.metrics[name] for b in blocks]))
        table = pa.table(columns)
        writer = self._writers.get(kind)
        if writer is None:
            self._day_folder.mkdir(parents=True, exist_ok=True)
            path = self._day_folder / f"{kind}.{self._fmt}"
            writer = (pq.ParquetWriter(path, table.schema, compression="zstd")
                      if self._fmt == "parquet" else pa_csv.CSVWriter(path, table.schema))
            self._writers[kind] = writer
        writer.write_table(table)


class EpisodeWriter:
    """Writes ground-truth episodes (incidents or confounders) to a CSV file as they come."""

    def __init__(self, path: Path, fleet: Fleet, id_column: str) -> None:
        self._file: IO[str] = path.open("w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow([id_column, *EPISODE_COLUMNS])
        self._fleet = fleet

    def __call__(self, episode: Episode) -> None:
        """Write one episode."""
        fleet = self._fleet
        device = "" if episode.device < 0 else fleet.device_ids[episode.device]
        self._csv.writerow([
            episode.episode_id, device, fleet.district_ids[episode.district], episode.kind,
            episode.start_ms, episode.end_ms, _iso(episode.start_ms), _iso(episode.end_ms),
            episode.magnitude, episode.unit, episode.detail])

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class CommFaultWriter:
    """Streams communication-fault records to ``comm_faults.csv``.

    ``detail_ms`` means: gap → the gap's end; gateway_outage → the delivery time; late and
    duplicate → the delay; clock_skew → the shift of the reported ts; lost → 0.
    """

    def __init__(self, path: Path, fleet: Fleet) -> None:
        self._ids = pa.array(fleet.device_ids.tolist(), pa.string())
        self._names = pa.array([fault.name.lower() for fault in CommFault], pa.string())
        self._schema = pa.schema([("device_id", pa.string()), ("seq", pa.int64()),
                                  ("ts_ms", pa.int64()), ("fault", pa.string()),
                                  ("detail_ms", pa.int64())])
        self._writer = pa_csv.CSVWriter(path, self._schema)

    def __call__(self, log: CommFaultLog) -> None:
        """Write the records of one step."""
        self._writer.write_table(pa.table([
            self._ids.take(pa.array(log.device)), pa.array(log.seq), pa.array(log.ts_ms),
            self._names.take(pa.array(log.fault)), pa.array(log.detail_ms)],
            schema=self._schema))

    def close(self) -> None:
        """Close the file."""
        self._writer.close()


def write_registry(path: Path, fleet: Fleet, config: SimConfig) -> None:
    """Write one row per device: kind, customer type, critical flag, place and gateway."""
    ctype = fleet.customer_type
    cadence = np.where(fleet.kind == DeviceKind.CUSTOMER_METER,
                       config.fleet.customer_cadence_s, config.fleet.scada_cadence_s)
    table = pa.table({
        "device_id": fleet.device_ids.tolist(),
        "device_kind": [KIND_NAMES[k] for k in fleet.kind.tolist()],
        "customer_type": [CUSTOMER_TYPE_NAMES[t] if t >= 0 else "" for t in ctype.tolist()],
        "critical": fleet.critical,
        "site": [fleet.district_ids[d] for d in fleet.district_of.tolist()],
        "district": [fleet.district_ids[d] for d in fleet.district_of.tolist()],
        "gateway_id": fleet.gateway_ids[fleet.gateway_of].tolist(),
        "cadence_s": cadence.astype(np.int64),
        "lat": fleet.lat,
        "lon": fleet.lon,
    })
    pa_csv.write_csv(table, path)


def write_run(
    config: SimConfig, out_dir: Path, fmt: Format = "parquet",
    on_block: Callable[[ReadingBlock], None] | None = None,
) -> RunStats:
    """Run ``config`` and write all its files into ``out_dir``; return the run's counters.

    ``on_block`` (optional) sees every block after it is written, e.g. to show progress.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    simulator = FleetSimulator(config)
    fleet = simulator.fleet
    files: list[Any] = []
    try:
        truth = EpisodeWriter(out_dir / "ground_truth.csv", fleet, "incident_id")
        confounders = EpisodeWriter(out_dir / "confounders.csv", fleet, "confounder_id")
        faults = CommFaultWriter(out_dir / "comm_faults.csv", fleet)
        readings = ReadingsWriter(out_dir, fleet, fmt)
        files = [truth, confounders, faults, readings]

        def on_episode(episode: Episode) -> None:
            (truth if episode.episode_id.startswith("inc-") else confounders)(episode)

        simulator.on_episode, simulator.on_comm_faults = on_episode, faults
        write_registry(out_dir / "registry.csv", fleet, config)
        for block in simulator:
            readings.add(block)
            if on_block is not None:
                on_block(block)
    finally:
        for file in files:
            file.close()
    stats = simulator.stats
    (out_dir / "run.json").write_text(json.dumps(_run_record(config, stats), indent=2) + "\n")
    return stats


def _run_record(config: SimConfig, stats: RunStats) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    settings["start"] = config.start.isoformat()
    counts = {"produced": stats.produced, "delivered": stats.delivered, "lost": stats.lost,
              "duplicated": stats.duplicated, "produced_by_kind": dict(stats.produced_by_kind),
              "incidents": dict(sorted(stats.incidents.items())),
              "confounders": dict(sorted(stats.confounders.items())),
              "comm_faults": dict(sorted(stats.comm_faults.items()))}
    return {"config": settings, "counts": counts}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
