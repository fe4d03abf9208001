"""ReadingBatcher: seq assignment that survives restarts, size/delay batching, full outbox."""

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.batcher import ReadingBatcher
from edge_agent.outbox import Outbox
from meshwatch.contract import TelemetryBatch, decode

T0 = 1_767_571_200_000


def _stored(box: Outbox) -> list[tuple[str, int, int]]:
    rows = []
    for message in box.peek(10_000):
        batch = decode(message.payload, TelemetryBatch)
        assert message.readings == len(batch.readings)
        rows += [(r.device_id, r.seq, r.ts_ms) for r in batch.readings]
    return rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), max_size=60), st.integers(1, 7))
def test_every_reading_is_stored_once_with_consecutive_seqs(tmp_path_factory, devices, size):
    path = tmp_path_factory.mktemp("b") / "o.db"
    with Outbox(path, synchronous="NORMAL") as box:
        batcher = ReadingBatcher(box, site="s", gateway_id="g", max_readings=size)
        for i, device in enumerate(devices[: len(devices) // 2]):
            batcher.add(device, T0 + i, {"flow_lpm": float(i)}, now=0.0)
        assert batcher.flush()
    with Outbox(path, synchronous="NORMAL") as box:  # a restart keeps counting
        batcher = ReadingBatcher(box, site="s", gateway_id="g", max_readings=size)
        for i, device in enumerate(devices[len(devices) // 2:], start=len(devices) // 2):
            batcher.add(device, T0 + i, {"flow_lpm": float(i)}, now=0.0)
        assert batcher.flush()
        stored = _stored(box)
    assert [ts - T0 for _, _, ts in stored] == list(range(len(devices)))
    for device in "abc":
        seqs = [seq for d, seq, _ in stored if d == device]
        assert seqs == list(range(len(seqs)))


def test_batches_are_written_by_size_or_by_delay(tmp_path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        batcher = ReadingBatcher(box, site="s", gateway_id="g", max_readings=3, max_delay_s=5)
        batcher.add("m", T0, {"flow_lpm": 1.0}, now=100.0)
        batcher.add("m", T0 + 1, {"flow_lpm": 1.0}, now=101.0)
        assert box.depth == 0
        assert batcher.pending == 2
        batcher.flush_due(now=104.9)
        assert box.depth == 0
        batcher.flush_due(now=105.0)
        assert box.depth == 1
        assert batcher.pending == 0
        for i in range(3):
            batcher.add("m", T0 + 10 + i, {"flow_lpm": 1.0}, now=200.0)
        assert box.depth == 2
        assert [len(decode(m.payload, TelemetryBatch).readings) for m in box.peek(9)] == [2, 3]


def test_a_full_outbox_keeps_readings_pending_then_sheds_the_oldest(tmp_path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=1200) as box:
        batcher = ReadingBatcher(box, site="s", gateway_id="g", max_readings=2, max_pending=6)
        for i in range(14):
            batcher.add("m", T0 + i, {"flow_lpm": float(i)}, now=0.0)
        stored = _stored(box)
        assert [seq for _, seq, _ in stored] == list(range(6))  # what fitted in the outbox
        assert batcher.pending == 6
        assert batcher.dropped == 2
        for message in box.peek(100):  # the publisher drains the outbox
            box.ack([message.id])
        assert batcher.flush()
        seqs = [seq for _, seq, _ in _stored(box)]
        assert seqs == list(range(8, 14))  # the newest survive; seqs 6 and 7 show the loss


def test_invalid_readings_raise_and_use_no_seq(tmp_path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        batcher = ReadingBatcher(box, site="s", gateway_id="g", max_readings=1)
        with pytest.raises(pydantic.ValidationError):
            batcher.add("m", T0, {"flow": 1.0})
        with pytest.raises(pydantic.ValidationError):
            batcher.add("m", T0, {"flow_lpm": float("nan")})
        batcher.add("m", T0, {"flow_lpm": 2.0})
        assert [seq for _, seq, _ in _stored(box)] == [0]
    with pytest.raises(ValueError, match="max_readings"):
        ReadingBatcher(box, site="s", gateway_id="g", max_readings=0)
