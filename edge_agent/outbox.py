"""Durable store-and-forward queue for outgoing MQTT messages, in one SQLite file (WAL).

Every message is appended *before* it is published and deleted only after the broker
acknowledged it, so nothing is lost when the process dies, the broker is away or the
network drops. Delivery is at-least-once: an acked message whose delete did not reach the
disk is sent again, and consumers de-duplicate by ``(device, seq)``.

Two lanes: a message is *ordinary* (telemetry, scores) or *urgent*
(``OutgoingMessage(urgent=True)``; edge alerts). :meth:`Outbox.peek` returns the urgent lane
before the ordinary one, and each lane in insertion order; ids grow across both lanes, so a
cursor (``after_id``) pages within one lane. What holds:

- Within each lane, messages come out in exactly the order they were appended, so every
  key's (device's) order within a lane is kept. Telemetry is always ordinary, so per-device
  order of readings is that of the appends.
- Across lanes there is no order: an urgent message appended after an ordinary one may be
  sent before it (that is the point). Never split one key's ordered stream across lanes.
- The flag is stored with the message (column ``urgent``), so it survives restarts; dead
  letters keep it too. Schema version 2 added it; a version-1 file is upgraded in place when
  opened (``ALTER TABLE ... ADD COLUMN``, its messages stay ordinary).
- ``drop_oldest`` (below) drops the oldest *ordinary* messages first and urgent ones only when
  no ordinary message is left: urgent messages are rare, small and worth the most.

Durability (``synchronous=``, SQLite in WAL mode):

- ``"FULL"`` (default): every append commits with an fsync of the WAL. A message whose
  ``append`` returned survives a process crash (``kill -9``, OOM) **and** a power loss or
  kernel panic. Field gateways lose power, and "never lose a reading" is the requirement, so
  this is the default. It costs one fsync per append call: batch with :meth:`append_many`
  (one transaction, one fsync) when the input rate is high.
- ``"NORMAL"``: commits are not fsynced (the WAL is synced at checkpoints). An append that
  returned survives a process crash, because the data is already in the kernel's page
  cache; a power loss can roll back the last commits (never corrupts the file). Choose it
  where the gateway has a UPS or losing the last second of readings on power loss is
  acceptable.

Measured on the 2-core dev VM (13.5 kB payloads of 100 readings; this VM's fsync is fast, an
SD card's is 10-100x slower): single appends FULL ~4.5k/s, NORMAL ~14k/s; ``append_many`` of
10, FULL ~16k/s, NORMAL ~20k/s; acks in groups of 32 ~23k messages/s.

Acks (deletes) always commit without an fsync, whatever the setting: a delete lost to a
power cut only means that message is sent again, which at-least-once allows, and the next
synced append flushes it anyway (the WAL is written in order).

Disk bound (``max_bytes``): the stored size of a message is its payload, topic and key bytes
plus :data:`ROW_OVERHEAD`; :attr:`Outbox.bytes_used` is the sum over queued messages and dead
letters. The file measured within a few percent of that, plus the WAL (truncated to 4 MiB after
checkpoints; one large transaction can grow it further); it never shrinks, since freed pages are
reused rather than returned to the OS. So leave the WAL and some slack on top of ``max_bytes``.
When a message does not fit (``full_policy=``):

- ``"refuse"`` (default): :class:`OutboxFull` is raised and nothing is stored; the caller
  must slow its input (back-pressure) and retry once the publisher has drained some. Never
  drops anything.
- ``"drop_oldest"`` (opt-in): the oldest messages are deleted, in the same transaction as the
  append, until the new ones fit. Every dropped message and reading is counted in
  :attr:`Outbox.dropped_messages` / :attr:`Outbox.dropped_readings`; the counters are stored in
  the file, so they survive restarts, and a warning is logged (at most every 10 s).

A message larger than ``max_bytes`` on its own raises ``ValueError`` under both policies. A
disk that fills up before ``max_bytes`` is reached also raises :class:`OutboxFull`.

Dead letters: a message the broker refuses for good (e.g. not authorized) is moved with
:meth:`Outbox.set_aside` to the ``dead_letters`` table, with the reason, so that it cannot stall
the queue. It is never sent again but stays in the file, counted in :attr:`Outbox.dead_letters`
and in ``bytes_used`` (``drop_oldest`` does not drop dead letters).

Threading: one connection guarded by a lock; any thread may call any method (typically one
writer thread appends while the publisher thread peeks and acks). Processes: the file is
opened in SQLite's exclusive locking mode, so a second process (a stale agent) cannot open
the same outbox and send its messages twice; the OS drops the lock when the owner dies.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "outbox.db"
>>> box = Outbox(path, synchronous="NORMAL")
>>> first = box.append("mw/v1/site/s1/gw/g1/telemetry", b'{"n": 1}', key="mtr-1", readings=1)
>>> _ = box.append_many([OutgoingMessage("mw/v1/site/s1/gw/g1/telemetry", b'{"n": 2}')])
>>> [m.payload for m in box.peek(10)]
[b'{"n": 1}', b'{"n": 2}']
>>> box.ack([first])
1
>>> box.depth, [m.payload for m in box.peek(10)]
(1, [b'{"n": 2}'])
>>> alert = box.append("mw/v1/site/s1/gw/g1/alerts", b'{"a": 1}', urgent=True)
>>> [m.payload for m in box.peek(10)], box.urgent_depth  # the urgent lane comes first
([b'{"a": 1}', b'{"n": 2}'], 1)
>>> box.close()
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = [
    "ROW_OVERHEAD",
    "FullPolicy",
    "Outbox",
    "OutboxError",
    "OutboxFull",
    "OutgoingMessage",
    "QueuedMessage",
    "Synchronous",
]

log = logging.getLogger(__name__)

Synchronous = Literal["FULL", "NORMAL"]
FullPolicy = Literal["refuse", "drop_oldest"]

ROW_OVERHEAD = 64
"""Bytes counted per message on top of payload, topic and key (ids, flags, SQLite records)."""

CACHE_KIB = 512
"""SQLite page cache of the outbox connection. The hot pages are few (the tail where appends go,
the head that is peeked and deleted) and missed pages come from the OS page cache: SQLite's
default of 2,000 KiB took the same CPU time in an append/peek/ack loop of 48 kB messages and
added ~1.2 MB to the agent's peak RSS (BENCHMARKS.md, edge agent)."""
SCHEMA_VERSION = 2
"""Version 2 added the ``urgent`` column; a version-1 file is upgraded in place on open."""
_DROP_WARNING_EVERY_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    key TEXT,
    readings INTEGER NOT NULL,
    created_s REAL NOT NULL,
    size INTEGER NOT NULL,
    urgent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    key TEXT,
    readings INTEGER NOT NULL,
    created_s REAL NOT NULL,
    size INTEGER NOT NULL,
    reason TEXT NOT NULL,
    set_aside_s REAL NOT NULL,
    urgent INTEGER NOT NULL DEFAULT 0
);
-- The urgent lane is found without scanning the (possibly huge) ordinary backlog.
CREATE INDEX IF NOT EXISTS messages_urgent ON messages (id) WHERE urgent = 1;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, next INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped_messages', 0), ('dropped_readings', 0);
"""

_UPGRADE_FROM_1 = """
ALTER TABLE messages ADD COLUMN urgent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dead_letters ADD COLUMN urgent INTEGER NOT NULL DEFAULT 0;
"""
_COLUMNS = "topic, payload, qos, retain, key, readings, created_s, size, urgent"


class OutboxError(RuntimeError):
    """The outbox cannot be used as asked; the message says why and what to do."""


class OutboxFull(OutboxError):
    """No room for the message: the caller should slow its input and retry later."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to append: MQTT fields plus metadata.

    ``key`` is the ordering key (usually the device id; each lane keeps its insertion order,
    which keeps every key's order within the lane too), ``readings`` how many readings the
    message carries, so dropped readings can be counted, and ``urgent`` puts the message in the
    urgent lane, which is sent before the ordinary one (see the module doc).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    key: str | None = None
    readings: int = 0
    urgent: bool = False


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A stored message, as :meth:`Outbox.peek` returns it; ``id`` grows with insertion."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    key: str | None
    readings: int
    created_s: float
    urgent: bool = False


class Outbox:
    """A durable two-lane queue (urgent, ordinary) of outgoing MQTT messages in one SQLite file.

    Args:
        path: the database file; created with its directory if missing.
        max_bytes: bound on :attr:`bytes_used` (see the module doc); default 256 MiB.
        full_policy: ``"refuse"`` (default) or ``"drop_oldest"``.
        synchronous: ``"FULL"`` (default) or ``"NORMAL"``; see the module doc.

    Raises:
        OutboxError: another process has the file open, or it was written by an
            incompatible version.
        ValueError: an argument is out of range.

    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        full_policy: FullPolicy = "refuse",
        synchronous: Synchronous = "FULL",
    ) -> None:
        if max_bytes <= ROW_OVERHEAD:
            msg = f"max_bytes must be more than {ROW_OVERHEAD} (one empty message), got {max_bytes}"
            raise ValueError(msg)
        if full_policy not in ("refuse", "drop_oldest"):
            msg = f"full_policy must be 'refuse' or 'drop_oldest', got {full_policy!r}"
            raise ValueError(msg)
        if synchronous not in ("FULL", "NORMAL"):
            msg = f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.full_policy: FullPolicy = full_policy
        self.synchronous: Synchronous = synchronous
        self._lock = threading.Lock()
        self._last_drop_warning = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._open()
        try:
            depth, queued, urgent = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(urgent), 0) FROM messages"
            ).fetchone()
            dead, dead_bytes = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead_letters"
            ).fetchone()
            counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
            sequences = dict(conn.execute("SELECT device, next FROM sequences").fetchall())
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn
        self._depth = int(depth)
        self._urgent_depth = int(urgent)
        self._bytes = int(queued) + int(dead_bytes)
        self._dead_letters = int(dead)
        self._dropped_messages: int = counters["dropped_messages"]
        self._dropped_readings: int = counters["dropped_readings"]
        self._next_seq: dict[str, int] = sequences

    # -- writing -------------------------------------------------------------------------------

    def append(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        key: str | None = None,
        readings: int = 0,
        urgent: bool = False,
    ) -> int:
        """Store one message durably and return its id (``urgent``: in the urgent lane).

        Raises:
            OutboxFull: no room under the ``"refuse"`` policy (or the disk is full).
            ValueError: bad field, or the message alone is larger than ``max_bytes``.

        """
        message = OutgoingMessage(topic, payload, qos, retain, key, readings, urgent)
        return self.append_many([message])[0]

    def append_many(
        self, messages: Sequence[OutgoingMessage], next_seq: Mapping[str, int] | None = None
    ) -> list[int]:
        """Store messages in one transaction (all or none) and return their ids, in order.

        ``next_seq`` records, in the same transaction, the next ``seq`` of each device whose
        readings the messages carry (see :meth:`next_seq`): a seq is persisted exactly when
        the reading that used it is, so it is never reused for another stored reading.

        Raises:
            OutboxFull: no room for all of them under ``"refuse"`` (nothing is stored).
            ValueError: bad field, or the messages alone are larger than ``max_bytes``.

        """
        sizes = [self._validated_size(m) for m in messages]
        incoming = sum(sizes)
        if incoming > self.max_bytes:
            msg = (
                f"{len(messages)} message(s) of {incoming} bytes can never fit in an outbox of"
                f" max_bytes={self.max_bytes}; split the batch or raise max_bytes"
            )
            raise ValueError(msg)
        now = time.time()
        rows = [
            (m.topic, m.payload, m.qos, int(m.retain), m.key, m.readings, now, size, int(m.urgent))
            for m, size in zip(messages, sizes, strict=True)
        ]
        with self._lock:
            db = self._db()
            overflow = self._bytes + incoming - self.max_bytes
            if overflow > 0 and self.full_policy == "refuse":
                msg = (
                    f"outbox {self.path} is full: {self._bytes} of {self.max_bytes} bytes used by"
                    f" {self._depth} messages, {incoming} more bytes offered. Slow the input"
                    f" until the publisher drains it, raise max_bytes, or opt in to"
                    f" full_policy='drop_oldest'."
                )
                raise OutboxFull(msg)
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    dropped = self._drop_oldest(db, overflow) if overflow > 0 else (0, 0, 0, 0)
                    ids = [
                        db.execute(
                            f"INSERT INTO messages ({_COLUMNS})"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                            row,
                        ).fetchone()[0]
                        for row in rows
                    ]
                    if next_seq:
                        db.executemany(
                            "INSERT INTO sequences VALUES (?, ?)"
                            " ON CONFLICT(device) DO UPDATE SET next = excluded.next",
                            next_seq.items(),
                        )
                    db.execute("COMMIT")
                except BaseException:
                    _rollback(db)
                    raise
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                msg = (
                    f"the disk holding outbox {self.path} is full ({exc}); free disk space or"
                    f" lower max_bytes (now {self.max_bytes}) below the free space"
                )
                raise OutboxFull(msg) from exc
            self._count_drops(*dropped)
            if next_seq:
                self._next_seq.update(next_seq)
            self._depth += len(ids)
            self._urgent_depth += sum(row[-1] for row in rows)
            self._bytes += incoming
            return ids

    def next_seq(self, device_id: str) -> int:
        """The next ``seq`` for a device: 0 at first, then as stored by :meth:`append_many`."""
        with self._lock:
            return self._next_seq.get(device_id, 0)

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged messages; return how many were still stored.

        Unknown ids (already acked or dropped) are ignored, so acking twice is harmless.
        """
        return self._remove(ids, None)

    def set_aside(self, ids: Iterable[int], reason: str) -> int:
        """Move messages the broker refused for good to the ``dead_letters`` table.

        They are no longer sent, so one bad message cannot stall the queue, but they stay in
        the file (inspect them with ``sqlite3 FILE 'SELECT * FROM dead_letters'``) and keep
        counting against ``max_bytes``. Returns how many were moved; unknown ids are ignored.
        """
        return self._remove(ids, reason)

    def _remove(self, ids: Iterable[int], reason: str | None) -> int:
        """Delete ids from the queue; with a reason, keep them as dead letters."""
        wanted = _json_ints(sorted(set(ids)))
        if wanted == "[]":
            return 0
        with self._lock:
            db = self._db()
            if self.synchronous != "NORMAL":
                db.execute("PRAGMA synchronous=NORMAL")  # a lost delete is only a resend
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if reason is not None:
                        db.execute(
                            f"INSERT INTO dead_letters (id, {_COLUMNS}, reason, set_aside_s)"
                            f" SELECT id, {_COLUMNS}, ?, ? FROM messages"
                            " WHERE id IN (SELECT value FROM json_each(?))",
                            (reason, time.time(), wanted),
                        )
                    sizes = db.execute(
                        "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))"
                        " RETURNING size, urgent",
                        (wanted,),
                    ).fetchall()
                    db.execute("COMMIT")
                except BaseException:
                    _rollback(db)
                    raise
            finally:
                if self.synchronous != "NORMAL":
                    db.execute(f"PRAGMA synchronous={self.synchronous}")
            self._depth -= len(sizes)
            self._urgent_depth -= sum(urgent for _, urgent in sizes)
            if reason is None:
                self._bytes -= sum(size for size, _ in sizes)
            else:
                self._dead_letters += len(sizes)
            return len(sizes)

    # -- reading -------------------------------------------------------------------------------

    def peek(
        self, limit: int, after_id: int | None = None, *, urgent: bool | None = None
    ) -> list[QueuedMessage]:
        """Up to ``limit`` stored messages with ids above ``after_id``, in sending order.

        ``urgent=True`` or ``False`` reads that lane only, in insertion order; ``after_id`` is
        then a cursor within the lane. ``None`` (default) reads the urgent lane first, then the
        ordinary one, each in insertion order. Ids grow across both lanes, so to page through
        both, keep one cursor per lane (as the publisher does).
        """
        if limit < 0:
            msg = f"limit must be >= 0, got {limit}"
            raise ValueError(msg)
        after = -1 if after_id is None else after_id
        lanes = (True, False) if urgent is None else (bool(urgent),)
        rows: list[tuple] = []
        with self._lock:
            db = self._db()
            for lane in lanes:
                if len(rows) >= limit:
                    break
                if lane and not self._urgent_depth:
                    continue  # nothing urgent is stored: skip the query
                # The lane is a literal, so the urgent query always plans on the partial index.
                rows += db.execute(
                    "SELECT id, topic, payload, qos, retain, key, readings, created_s, urgent"
                    f" FROM messages WHERE urgent = {int(lane)} AND id > ? ORDER BY id LIMIT ?",
                    (after, limit - len(rows)),
                ).fetchall()
        return [
            QueuedMessage(i, topic, bytes(payload), qos, bool(retain), key, n, created, bool(u))
            for i, topic, payload, qos, retain, key, n, created, u in rows
        ]

    @property
    def depth(self) -> int:
        """How many messages are stored (not yet acked)."""
        return self._depth

    @property
    def urgent_depth(self) -> int:
        """How many of the stored messages are in the urgent lane."""
        return self._urgent_depth

    @property
    def bytes_used(self) -> int:
        """Stored size of the queued messages and dead letters, as bounded by ``max_bytes``."""
        return self._bytes

    @property
    def dead_letters(self) -> int:
        """Messages set aside with :meth:`set_aside` (still in the file, never sent again)."""
        return self._dead_letters

    @property
    def dropped_messages(self) -> int:
        """Messages deleted unsent by the ``"drop_oldest"`` policy, over the file's life."""
        return self._dropped_messages

    @property
    def dropped_readings(self) -> int:
        """Readings in those dropped messages (their ``readings`` metadata)."""
        return self._dropped_readings

    def oldest_age_s(self, now: float | None = None) -> float:
        """Seconds since the oldest stored message was appended (0.0 when empty).

        ``now`` is wall-clock epoch seconds (``time.time()`` if None).
        """
        with self._lock:
            (created,) = self._db().execute("SELECT MIN(created_s) FROM messages").fetchone()
        if created is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - float(created))

    @staticmethod
    def size_of(message: OutgoingMessage) -> int:
        """The size a message counts against ``max_bytes``.

        >>> Outbox.size_of(OutgoingMessage("t/1", b"12345")) == 3 + 5 + ROW_OVERHEAD
        True
        """
        key = len(message.key.encode()) if message.key is not None else 0
        return len(message.payload) + len(message.topic.encode()) + key + ROW_OVERHEAD

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint and close the file; later calls raise OutboxError. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Outbox {self.path} depth={self._depth} bytes={self._bytes}/{self.max_bytes}"
            f" policy={self.full_policy} synchronous={self.synchronous}>"
        )

    # -- internals -----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=0.0
        )
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA journal_size_limit=4194304")  # truncate the WAL to 4 MiB
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version not in (0, 1, SCHEMA_VERSION):
                msg = (
                    f"outbox {self.path} has schema version {version}; this build reads version"
                    f" {SCHEMA_VERSION} (and upgrades version 1). Drain it with the agent version"
                    f" that wrote it, or move it aside."
                )
                raise OutboxError(msg)
            # A write transaction takes the exclusive lock, which the connection then keeps.
            upgrade = _UPGRADE_FROM_1 if version == 1 else ""
            conn.executescript(
                f"BEGIN IMMEDIATE;{upgrade}{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;"
            )
        except sqlite3.OperationalError as exc:
            conn.close()
            if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                msg = (
                    f"outbox {self.path} is open in another process (SQLite says: {exc}); stop"
                    f" that agent first, only one process may own an outbox"
                )
                raise OutboxError(msg) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            msg = f"outbox {self.path} is closed; open a new Outbox to use it again"
            raise OutboxError(msg)
        return self._conn

    def _validated_size(self, message: OutgoingMessage) -> int:
        if message.qos not in (1, 2):
            msg = (
                f"qos must be 1 or 2 for a stored message, got {message.qos!r};"
                f" publish QoS 0 messages directly, they need no outbox"
            )
            raise ValueError(msg)
        if not isinstance(message.payload, bytes | bytearray):
            msg = f"payload must be bytes, got {type(message.payload).__name__}; encode it first"
            raise ValueError(msg)
        if not message.topic or any(c in message.topic for c in "+#\0"):
            msg = f"topic must be a non-empty MQTT topic name without + # or NUL: {message.topic!r}"
            raise ValueError(msg)
        if message.readings < 0:
            msg = f"readings must be >= 0, got {message.readings}"
            raise ValueError(msg)
        return self.size_of(message)

    def _drop_oldest(self, db: sqlite3.Connection, overflow: int) -> tuple[int, int, int, int]:
        """Delete the oldest messages until ``overflow`` bytes are freed (inside a transaction).

        Ordinary messages go first; urgent ones only once no ordinary message is left.
        Returns (messages, readings, bytes, urgent messages) dropped.
        """
        freed = readings = count = urgent = 0
        for lane in (0, 1):
            if freed >= overflow:
                break
            last_id = None
            oldest = db.execute(
                f"SELECT id, size, readings FROM messages WHERE urgent = {lane} ORDER BY id"
            )
            try:
                for row_id, size, row_readings in oldest:
                    last_id = row_id
                    freed += size
                    readings += row_readings
                    count += 1
                    urgent += lane
                    if freed >= overflow:
                        break
            finally:
                oldest.close()
            if last_id is not None:
                db.execute("DELETE FROM messages WHERE urgent = ? AND id <= ?", (lane, last_id))
        if freed < overflow:
            msg = (
                f"outbox {self.path} is full of dead letters ({self._dead_letters} messages the"
                f" broker refused); inspect and delete them from the dead_letters table, or"
                f" raise max_bytes"
            )
            raise OutboxFull(msg)
        if count:
            db.executemany(
                "UPDATE counters SET value = value + ? WHERE name = ?",
                [(count, "dropped_messages"), (readings, "dropped_readings")],
            )
        return count, readings, freed, urgent

    def _count_drops(self, messages: int, readings: int, freed: int, urgent: int) -> None:
        if not messages:
            return
        self._depth -= messages
        self._urgent_depth -= urgent
        self._bytes -= freed
        self._dropped_messages += messages
        self._dropped_readings += readings
        now = time.monotonic()
        if now - self._last_drop_warning >= _DROP_WARNING_EVERY_S:
            self._last_drop_warning = now
            log.warning(
                "outbox %s full: dropped the %d oldest message(s) (%d readings); %d messages"
                " and %d readings dropped so far",
                self.path,
                messages,
                readings,
                self._dropped_messages,
                self._dropped_readings,
            )


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite ends some on its own, e.g. disk full)."""
    if db.in_transaction:
        db.execute("ROLLBACK")


def _json_ints(values: Iterable[int]) -> str:
    """A JSON array of ints, for ``json_each``; ints only, so no escaping is needed."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"
