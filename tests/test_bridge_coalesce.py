"""The coalescer: every forwarded reading lands in exactly one mesh message, in order, owned."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_bridge.coalesce import MAX_READINGS, Coalescer
from mesh_bridge.route import PartitionBatch
from meshwatch.contract import Reading, TelemetryBatch, decode, topics

T0 = 1_767_225_600_000
P = 3


def part(partition: int, gateway: str, seqs: list[int], sent_ms: int = T0) -> PartitionBatch:
    readings = [Reading(device_id=f"{gateway}-p{partition}", ts_ms=T0 + s, seq=s,
                        metrics={"flow_lpm": 1.0}) for s in seqs]
    return PartitionBatch(partition, "s1", gateway, sent_ms, readings)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, P - 1), st.sampled_from(["gw-a", "gw-b"]),
                                   st.integers(1, 40)), max_size=4, unique_by=lambda t: t[:2]),
                min_size=1, max_size=30),
       st.integers(1, 60), st.lists(st.booleans(), min_size=30, max_size=30))
def test_every_reading_once_in_order_and_every_part_owned_once(
    messages: list[list[tuple[int, str, int]]], max_readings: int, flush_after: list[bool],
) -> None:
    coalescer: Coalescer[int] = Coalescer(P, max_readings)
    next_seq: Counter[tuple[int, str]] = Counter()
    sent: dict[str, list[int]] = {}
    out = []
    expected_owners: Counter[int] = Counter()
    for owner, parts in enumerate(messages):
        batches = []
        for partition, gateway, count in parts:
            first = next_seq[partition, gateway]
            next_seq[partition, gateway] += count
            batch = part(partition, gateway, list(range(first, first + count)), T0 + owner)
            sent.setdefault(batch.readings[0].device_id, []).extend(range(first, first + count))
            batches.append(batch)
        expected_owners[owner] = len(batches)
        out += coalescer.add(owner, batches)
        if flush_after[owner]:
            out += coalescer.flush()
    out += coalescer.flush()
    assert len(coalescer) == 0
    got: dict[str, list[int]] = {}
    owners: Counter[int] = Counter()
    for message in out:
        batch = decode(message.payload, TelemetryBatch)
        assert len(batch.readings) == message.readings <= max(max_readings - 1 + 40, 1)
        assert {topics.mesh_telemetry(int(r.device_id[-1])) for r in batch.readings} == {
            message.topic}
        assert batch.sent_ms == T0 + min(message.owners)  # the earliest part's sent_ms
        owners.update(message.owners)
        for reading in batch.readings:
            got.setdefault(reading.device_id, []).append(reading.seq)
    assert got == sent  # each device's readings once each, in order
    assert owners == expected_owners  # one owner entry per partition batch added


def test_a_batch_never_grows_past_the_contract_limit() -> None:
    coalescer: Coalescer[str] = Coalescer(1, max_readings=MAX_READINGS)
    assert coalescer.add("a", [part(0, "gw", list(range(6000)))]) == []
    [full] = coalescer.add("b", [part(0, "gw", list(range(6000, 12_000)))])
    assert (full.readings, full.owners) == (6000, ["a"])
    [rest] = coalescer.flush()
    assert (rest.readings, rest.owners) == (6000, ["b"])


def test_max_readings_must_fit_the_contract() -> None:
    with pytest.raises(ValueError, match=r"1\.\.10000"):
        Coalescer(4, max_readings=10_001)
