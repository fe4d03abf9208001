"""Durable outbox: lanes, order, acks, accounting, full policies, reopening, SIGKILL, a model."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge_agent.outbox import (
    ROW_OVERHEAD,
    FullPolicy,
    Outbox,
    OutboxError,
    OutboxFull,
    OutgoingMessage,
)

REPO = Path(__file__).resolve().parents[1]
TOPIC = "mw/v1/site/s1/gw/g1/telemetry"


ALERTS = "mw/v1/site/s1/gw/g1/alerts"


def _msg(n: int, size: int = 10, readings: int = 1) -> OutgoingMessage:
    return OutgoingMessage(TOPIC, f"{n:0{size}d}".encode(), key=f"d{n % 3}", readings=readings)


def _urgent(n: int) -> OutgoingMessage:
    return OutgoingMessage(ALERTS, f"alert-{n}".encode(), key=f"d{n % 3}", urgent=True)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


def test_peek_returns_insertion_order_and_pages_with_after_id(path: Path) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        ids = [box.append(TOPIC, b"a", key="d1", readings=3, retain=True, qos=2)]
        ids += box.append_many([_msg(n) for n in range(5)])
        assert ids == sorted(ids)
        first = box.peek(2)
        assert [m.id for m in first] == ids[:2]
        assert (first[0].payload, first[0].key, first[0].readings) == (b"a", "d1", 3)
        assert (first[0].retain, first[0].qos, first[1].retain, first[1].qos) == (True, 2, False, 1)
        assert [m.id for m in box.peek(10, after_id=ids[1])] == ids[2:]
        assert box.peek(10, after_id=ids[-1]) == []
        assert box.peek(0) == []


def test_peek_returns_the_urgent_lane_first_and_each_lane_in_insertion_order(path: Path) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        o1, o2 = box.append_many([_msg(1), _msg(2)])
        u1 = box.append(ALERTS, b"alert-1", urgent=True)
        o3, u2, o4 = box.append_many([_msg(3), _urgent(2), _msg(4)])
        assert (box.depth, box.urgent_depth) == (6, 2)
        assert [m.id for m in box.peek(10)] == [u1, u2, o1, o2, o3, o4]
        assert [m.urgent for m in box.peek(10)] == [True, True, False, False, False, False]
        assert [m.id for m in box.peek(3)] == [u1, u2, o1]  # the limit spans both lanes
        assert [m.id for m in box.peek(10, urgent=True)] == [u1, u2]
        assert [m.id for m in box.peek(10, urgent=False)] == [o1, o2, o3, o4]
        # A cursor pages within one lane (ids grow across both).
        assert [m.id for m in box.peek(10, after_id=u1, urgent=True)] == [u2]
        assert [m.id for m in box.peek(2, after_id=o1, urgent=False)] == [o2, o3]
        assert box.peek(10, after_id=u2, urgent=True) == []
        assert box.ack([u1, o2]) == 2
        assert (box.depth, box.urgent_depth) == (4, 1)
        assert [m.id for m in box.peek(10)] == [u2, o1, o3, o4]
    with Outbox(path) as box:  # the flag is stored
        assert box.urgent_depth == 1
        assert [(m.id, m.urgent, m.topic) for m in box.peek(2)] == [
            (u2, True, ALERTS),
            (o1, False, TOPIC),
        ]
        assert box.set_aside([u2], "PUBACK 0x87 Not authorized") == 1
        assert (box.depth, box.urgent_depth, box.dead_letters) == (3, 0, 1)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id, urgent FROM dead_letters").fetchall() == [(u2, 1)]
    conn.close()


def test_drop_oldest_drops_ordinary_messages_before_urgent_ones(path: Path) -> None:
    one = Outbox.size_of(_msg(0))
    alert = Outbox.size_of(_urgent(0))
    with Outbox(path, max_bytes=2 * one + 2 * alert, full_policy="drop_oldest") as box:
        u0 = box.append_many([_urgent(0)])[0]
        _, o2 = box.append_many([_msg(1), _msg(2)])
        u1 = box.append_many([_urgent(1)])[0]
        (o3,) = box.append_many([_msg(3)])  # drops o1, the oldest ordinary, not u0
        assert [m.id for m in box.peek(10)] == [u0, u1, o2, o3]
        big = OutgoingMessage(TOPIC, b"x" * (2 * one + 1 - ROW_OVERHEAD - len(TOPIC)))
        assert Outbox.size_of(big) == 2 * one + 1  # more than all ordinary messages left
        (b,) = box.append_many([big])  # drops o2, o3 and only then the oldest urgent, u0
        assert [m.id for m in box.peek(10)] == [u1, b]
        assert (box.dropped_messages, box.dropped_readings) == (4, 3)
        assert (box.depth, box.urgent_depth) == (2, 1)


def test_a_version_1_file_is_upgraded_and_its_messages_are_ordinary(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, key TEXT,
            readings INTEGER NOT NULL, created_s REAL NOT NULL, size INTEGER NOT NULL);
        CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, key TEXT,
            readings INTEGER NOT NULL, created_s REAL NOT NULL, size INTEGER NOT NULL,
            reason TEXT NOT NULL, set_aside_s REAL NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        CREATE TABLE sequences (device TEXT PRIMARY KEY, next INTEGER NOT NULL);
        INSERT INTO counters VALUES ('dropped_messages', 0), ('dropped_readings', 0);
        INSERT INTO messages VALUES (7, 't/1', x'6f6c64', 1, 0, 'd1', 2, 1.0, 70);
        PRAGMA user_version=1;
        """
    )
    conn.close()
    with Outbox(path) as box:
        assert (box.depth, box.urgent_depth, box.bytes_used) == (1, 0, 70)
        old = box.peek(1)[0]
        assert (old.id, old.payload, old.urgent) == (7, b"old", False)
        urgent = box.append(ALERTS, b"now", urgent=True)
        assert [m.id for m in box.peek(10)] == [urgent, 7]
        assert box.set_aside([7], "refused") == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    assert conn.execute("SELECT id, urgent, reason FROM dead_letters").fetchall() == [
        (7, 0, "refused")
    ]
    conn.close()


def test_ack_deletes_only_those_ids_and_ignores_unknown_ones(path: Path) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        ids = box.append_many([_msg(n) for n in range(6)])
        assert box.ack([ids[1], ids[3], 10_000]) == 2
        assert box.ack([ids[1]]) == 0  # acking twice is harmless
        assert box.ack([]) == 0
        assert [m.id for m in box.peek(10)] == [ids[0], ids[2], ids[4], ids[5]]
        assert box.depth == 4


def test_depth_bytes_and_oldest_age(path: Path) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        assert (box.depth, box.bytes_used, box.oldest_age_s()) == (0, 0, 0.0)
        message = _msg(1, size=100)
        first = box.append(message.topic, message.payload, key=message.key)
        created = box.peek(1)[0].created_s
        box.append_many([_msg(2, size=50)])
        expected = Outbox.size_of(message) + Outbox.size_of(_msg(2, size=50))
        assert Outbox.size_of(message) == 100 + len(TOPIC) + 2 + ROW_OVERHEAD
        assert (box.depth, box.bytes_used) == (2, expected)
        assert box.oldest_age_s(now=created + 12.5) == pytest.approx(12.5)
        assert box.oldest_age_s(now=created - 5) == 0.0  # the clock stepped back
        box.ack([first])
        assert box.bytes_used == Outbox.size_of(_msg(2, size=50))
        assert box.oldest_age_s(now=created + 12.5) <= 12.5


def test_refuse_policy_raises_and_stores_nothing_until_acks_make_room(path: Path) -> None:
    one = Outbox.size_of(_msg(0))
    with Outbox(path, max_bytes=3 * one, synchronous="NORMAL") as box:
        ids = box.append_many([_msg(n) for n in range(3)])
        with pytest.raises(OutboxFull, match=r"is full.*Slow the input.*drop_oldest"):
            box.append(TOPIC, b"0000000099")
        with pytest.raises(OutboxFull):
            box.append_many([_msg(7), _msg(8)])
        assert [m.id for m in box.peek(10)] == ids
        assert (box.depth, box.bytes_used, box.dropped_messages) == (3, 3 * one, 0)
        box.ack(ids[:1])
        new = box.append(TOPIC, b"0000000099")
        assert [m.id for m in box.peek(10)] == [*ids[1:], new]


def test_drop_oldest_policy_drops_and_counts_every_reading(path: Path) -> None:
    one = Outbox.size_of(_msg(0))
    with Outbox(path, max_bytes=3 * one, full_policy="drop_oldest", synchronous="NORMAL") as box:
        ids = box.append_many([_msg(n, readings=10 + n) for n in range(3)])
        newer = box.append_many([_msg(3), _msg(4)])
        assert [m.id for m in box.peek(10)] == [ids[2], *newer]
        assert (box.dropped_messages, box.dropped_readings) == (2, 10 + 11)
        assert (box.depth, box.bytes_used) == (3, 3 * one)
    with Outbox(path, max_bytes=3 * one, full_policy="drop_oldest") as box:
        assert (box.dropped_messages, box.dropped_readings) == (2, 21)  # stored in the file


def test_set_aside_keeps_refused_messages_out_of_the_queue_but_in_the_file(path: Path) -> None:
    one = Outbox.size_of(_msg(0))
    with Outbox(path, max_bytes=3 * one, full_policy="drop_oldest") as box:
        ids = box.append_many([_msg(n) for n in range(3)])
        assert box.set_aside([ids[1], 999], "PUBACK 0x87 Not authorized") == 1
        assert [m.id for m in box.peek(10)] == [ids[0], ids[2]]
        assert (box.depth, box.dead_letters, box.bytes_used) == (2, 1, 3 * one)
        box.append_many([_msg(3), _msg(4)])  # drop_oldest drops queued messages only
        assert box.dropped_messages == 2
        with pytest.raises(OutboxFull, match="full of dead letters"):
            box.append_many([_msg(5), _msg(6), _msg(7)])
    with Outbox(path, max_bytes=3 * one) as box:
        assert (box.dead_letters, box.bytes_used) == (1, 3 * one)
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT payload, reason FROM dead_letters").fetchall()
    conn.close()
    assert rows == [(_msg(1).payload, "PUBACK 0x87 Not authorized")]


def test_a_message_that_can_never_fit_is_a_value_error(path: Path) -> None:
    with Outbox(path, max_bytes=200, full_policy="drop_oldest", synchronous="NORMAL") as box:
        box.append(TOPIC, b"x")
        with pytest.raises(ValueError, match=r"can never fit.*split the batch or raise max_bytes"):
            box.append(TOPIC, b"x" * 200)
        assert (box.depth, box.dropped_messages) == (1, 0)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (OutgoingMessage(TOPIC, b"x", qos=0), "qos must be 1 or 2"),
        (OutgoingMessage("a/+/b", b"x"), "without \\+ # or NUL"),
        (OutgoingMessage("", b"x"), "non-empty MQTT topic"),
        (OutgoingMessage(TOPIC, "text"), "payload must be bytes, got str"),  # type: ignore[arg-type]
        (OutgoingMessage(TOPIC, b"x", readings=-1), "readings must be >= 0"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(
    path: Path, message: OutgoingMessage, error: str
) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        with pytest.raises(ValueError, match=error):
            box.append_many([_msg(1), message])
        assert box.depth == 0  # all or nothing


def test_reopen_keeps_messages_and_never_reuses_ids(path: Path) -> None:
    with Outbox(path) as box:
        ids = box.append_many([_msg(n) for n in range(4)])
        box.ack(ids[2:])
    with Outbox(path) as box:
        assert [m.payload for m in box.peek(10)] == [_msg(0).payload, _msg(1).payload]
        assert (box.depth, box.bytes_used) == (2, 2 * Outbox.size_of(_msg(0)))
        box.ack(ids)
        assert box.append(TOPIC, b"later") > ids[-1]  # even after the queue was empty
    box.close()  # idempotent
    with pytest.raises(OutboxError, match="is closed; open a new Outbox"):
        box.peek(1)


def test_a_second_process_cannot_open_the_same_outbox(path: Path) -> None:
    probe = "import sys; from edge_agent.outbox import Outbox; Outbox(sys.argv[1])"
    with Outbox(path) as box:
        box.append(TOPIC, b"x")
        result = _python(probe, str(path))
        assert result.returncode != 0
        assert "is open in another process" in result.stderr
    assert _python(probe, str(path)).returncode == 0  # free again once closed


def test_a_file_from_another_schema_version_is_refused(path: Path) -> None:
    Outbox(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(OutboxError, match="schema version 99; this build reads version 2"):
        Outbox(path)


def test_a_full_disk_is_reported_as_outbox_full(path: Path) -> None:
    with Outbox(path, synchronous="NORMAL") as box:
        box._db().execute("PRAGMA max_page_count=20")  # SQLite now reports SQLITE_FULL
        appended = 0
        with pytest.raises(OutboxFull, match=r"disk holding outbox .* is full"):  # noqa: PT012
            while appended < 1000:
                box.append(TOPIC, _msg(appended, size=4000).payload)
                appended += 1
        depth = box.depth
        assert depth == appended
        assert depth == len(box.peek(1000)) > 0
        box._db().execute("PRAGMA max_page_count=100000")
        box.append(TOPIC, b"fits again")
        assert box.depth == depth + 1


def test_one_writer_thread_and_one_acking_thread(path: Path) -> None:
    total = 2000
    consumed: list[bytes] = []
    with Outbox(path, synchronous="NORMAL") as box:

        def write() -> None:
            for n in range(0, total, 4):
                box.append_many([_msg(k) for k in range(n, n + 4)])

        writer = threading.Thread(target=write)
        writer.start()
        cursor = None
        while len(consumed) < total:
            batch = box.peek(7, after_id=cursor)
            if batch:
                cursor = batch[-1].id
                consumed += [m.payload for m in batch]
                box.ack(m.id for m in batch)
        writer.join()
        assert consumed == [_msg(n).payload for n in range(total)]
        assert (box.depth, box.bytes_used) == (0, 0)


_KILL_CHILD = """
import sys
from edge_agent.outbox import Outbox
box = Outbox(sys.argv[1], synchronous=sys.argv[2])
n = 0
while True:
    row = box.append("t/kill", b"%08d" % n * 100, key="d%d" % (n % 5), readings=100)
    print(row, n, flush=True)
    n += 1
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_every_append_that_returned_survives_sigkill(path: Path, synchronous: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(path), synchronous],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    returned: dict[int, int] = {}
    for line in child.stdout:
        row, n = map(int, line.split())
        returned[row] = n
        if len(returned) == 150:
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait(timeout=10) == -signal.SIGKILL
    rest = child.stdout.read()  # through the same buffer the loop above read from
    child.stdout.close()
    for line in rest.splitlines():
        if len(line.split()) == 2:  # a line cut short by the kill is not a returned append
            row, n = map(int, line.split())
            returned[row] = n
    with Outbox(path) as box:
        stored = {m.id: m.payload for m in box.peek(100_000)}
    missing = [row for row in returned if row not in stored]
    assert not missing, f"{len(missing)} appends returned but were lost: {missing[:10]}"
    assert all(stored[row] == b"%08d" % n * 100 for row, n in returned.items())
    assert len(stored) - len(returned) <= 1  # at most the append the kill interrupted


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


# -- the outbox behaves like a list --------------------------------------------------------------

MAX_BYTES = 900  # a handful of messages, so the full policies are exercised often

messages = st.builds(
    OutgoingMessage,
    topic=st.sampled_from([TOPIC, "t/a", "mw/v1/site/s/gw/g/status"]),
    payload=st.binary(max_size=260),
    qos=st.sampled_from([1, 2]),
    retain=st.booleans(),
    key=st.none() | st.sampled_from(["mtr-1", "mtr-2"]),
    readings=st.integers(min_value=0, max_value=100),
    urgent=st.booleans(),
)


@settings(max_examples=60, stateful_step_count=25, deadline=None)
class OutboxMachine(RuleBasedStateMachine):
    """Appends, acks, peeks and reopens, checked against a plain list of (id, message).

    The expected sending order is the urgent messages, then the ordinary ones, each in the
    order of the list (insertion order).
    """

    policy: FullPolicy = "refuse"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.box = self._open()
        self.model: list[tuple[int, OutgoingMessage]] = []
        self.dropped = (0, 0)  # messages, readings
        self.last_id = 0

    def _open(self) -> Outbox:
        return Outbox(
            self.dir / "o.db", max_bytes=MAX_BYTES, full_policy=self.policy, synchronous="NORMAL"
        )

    @rule(batch=st.lists(messages, min_size=1, max_size=4))
    def append_many(self, batch: list[OutgoingMessage]) -> None:
        incoming = sum(Outbox.size_of(m) for m in batch)
        if incoming > MAX_BYTES:
            with pytest.raises(ValueError, match="can never fit"):
                self.box.append_many(batch)
            return
        used = sum(Outbox.size_of(m) for _, m in self.model)
        if used + incoming > MAX_BYTES and self.policy == "refuse":
            with pytest.raises(OutboxFull):
                self.box.append_many(batch)
            return
        while used + incoming > MAX_BYTES:  # ordinary messages are dropped first
            ordinary = [n for n, (_, m) in enumerate(self.model) if not m.urgent]
            _, oldest = self.model.pop(ordinary[0] if ordinary else 0)
            used -= Outbox.size_of(oldest)
            self.dropped = (self.dropped[0] + 1, self.dropped[1] + oldest.readings)
        ids = self.box.append_many(batch)
        assert ids == sorted(ids)
        assert ids[0] > self.last_id
        self.last_id = ids[-1]
        self.model += zip(ids, batch, strict=True)

    @rule(message=messages)
    def append(self, message: OutgoingMessage) -> None:
        self.append_many([message])

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        known = [i for i, _ in self.model]
        chosen = data.draw(st.lists(st.sampled_from(known), unique=True))
        unknown = data.draw(st.lists(st.integers(min_value=self.last_id + 1), max_size=2))
        assert self.box.ack(chosen + unknown) == len(chosen)
        self.model = [(i, m) for i, m in self.model if i not in set(chosen)]

    def _sending_order(self, urgent: bool | None = None) -> list[tuple[int, OutgoingMessage]]:
        lanes = (True, False) if urgent is None else (urgent,)
        return [(i, m) for lane in lanes for i, m in self.model if m.urgent == lane]

    @rule(
        limit=st.integers(min_value=0, max_value=6),
        skip=st.integers(min_value=0, max_value=6),
        urgent=st.sampled_from([None, True, False]),
    )
    def peek_after(self, limit: int, skip: int, urgent: bool | None) -> None:
        lane = self._sending_order(urgent)
        after = lane[skip - 1][0] if 0 < skip <= len(lane) else None
        expected = [i for i, _ in lane if after is None or i > after][:limit]
        assert [m.id for m in self.box.peek(limit, after_id=after, urgent=urgent)] == expected

    @rule()
    def reopen(self) -> None:
        self.box.close()
        self.box = self._open()

    @invariant()
    def matches_the_model(self) -> None:
        stored = self.box.peek(100)
        assert [
            (m.id, m.topic, m.payload, m.qos, m.retain, m.key, m.readings, m.urgent) for m in stored
        ] == [
            (i, m.topic, m.payload, m.qos, m.retain, m.key, m.readings, m.urgent)
            for i, m in self._sending_order()
        ]
        assert self.box.depth == len(self.model)
        assert self.box.urgent_depth == sum(m.urgent for _, m in self.model)
        assert self.box.bytes_used == sum(Outbox.size_of(m) for _, m in self.model)
        assert (self.box.dropped_messages, self.box.dropped_readings) == self.dropped

    def teardown(self) -> None:
        self.box.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class DropOldestMachine(OutboxMachine):
    """The same model with the opt-in drop_oldest policy."""

    policy: FullPolicy = "drop_oldest"


TestOutboxRefuseModel = OutboxMachine.TestCase
TestOutboxDropOldestModel = DropOldestMachine.TestCase


def test_sequences_persist_with_the_messages_that_used_them(tmp_path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_bytes=1000) as box:
        assert box.next_seq("mtr-1") == 0
        box.append_many([OutgoingMessage("t", b"a", readings=3)], next_seq={"mtr-1": 3})
        box.append_many([OutgoingMessage("t", b"b" * 600, readings=1)], next_seq={"mtr-1": 4})
        box.ack([box.peek(1)[0].id])  # acking never rewinds a sequence
        assert box.next_seq("mtr-1") == 4
        with pytest.raises(OutboxFull):
            box.append_many([OutgoingMessage("t", b"x" * 500)], next_seq={"mtr-1": 99})
        assert box.next_seq("mtr-1") == 4  # the refused append stored no sequence either
    with Outbox(path, max_bytes=1000) as box:
        assert box.next_seq("mtr-1") == 4
        assert box.next_seq("mtr-2") == 0
