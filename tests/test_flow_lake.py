"""The Parquet lake sink: files numbered by epoch, uncommitted ones deleted on resume."""

from __future__ import annotations

from dataflows.connectors.lake import LakeSink, read_lake
from dataflows.ordering import Kind, Point, Released
from dataflows.records import ShardOutput

T0 = 1_767_225_600_000
DAY = 86_400_000


def item(*points: Point) -> ShardOutput:
    return ShardOutput(0, Released(list(points)), {}, 0)


def point(seq: int, day: int = 0, kind: Kind = Kind.MEASURED) -> Point:
    return Point("m1", T0 + day * DAY + seq, seq, {"flow_lpm": 1.0}, kind)


def test_rows_land_in_date_partitions_and_imputed_points_stay_out(tmp_path) -> None:
    part = LakeSink(tmp_path, 2).build_part("lake", "p001", None)
    part.write_batch([item(point(1), point(2, day=1), point(-1, kind=Kind.IMPUTED),
                           point(3, kind=Kind.LATE))])
    assert part.snapshot() == 1
    assert part.snapshot() == 1  # an empty epoch writes nothing
    table = read_lake(tmp_path).sort_by("seq")
    assert table.column("seq").to_pylist() == [1, 2, 3]
    assert table.column("late").to_pylist() == [False, False, True]
    assert sorted(str(d) for d in table.column("date").to_pylist()) == [
        "2026-01-01", "2026-01-01", "2026-01-02"]
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == [
        "p001-0000000000.parquet", "p001-0000000000.parquet"]


def test_resuming_deletes_the_files_of_epochs_that_never_committed(tmp_path) -> None:
    sink = LakeSink(tmp_path, 1)
    part = sink.build_part("lake", "p000", None)
    part.write_batch([item(point(1))])
    committed = part.snapshot()  # this snapshot becomes durable
    part.write_batch([item(point(2), point(3, day=1))])
    part.snapshot()  # written, then the process dies before the epoch commits
    assert sorted(read_lake(tmp_path).column("seq").to_pylist()) == [1, 2, 3]
    resumed = sink.build_part("lake", "p000", committed)
    assert sorted(read_lake(tmp_path).column("seq").to_pylist()) == [1]
    resumed.write_batch([item(point(2), point(3, day=1))])  # the replay
    resumed.snapshot()
    assert sorted(read_lake(tmp_path).column("seq").to_pylist()) == [1, 2, 3]


def test_without_a_resume_state_numbering_continues_and_nothing_is_deleted(tmp_path) -> None:
    sink = LakeSink(tmp_path, 1)
    first = sink.build_part("lake", "p000", None)
    first.write_batch([item(point(1))])
    first.snapshot()
    again = sink.build_part("lake", "p000", None)
    again.write_batch([item(point(2))])
    assert again.snapshot() == 2
    assert sorted(read_lake(tmp_path).column("seq").to_pylist()) == [1, 2]
