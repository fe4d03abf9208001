"""Tables, engine and migrations of the remediation database (SQLAlchemy 2, Alembic).

SQLite (the default, ``sqlite:///meshwatch.db``) runs in WAL mode and takes the write lock at
the start of every transaction (``BEGIN IMMEDIATE``), so concurrent writers queue instead of
failing half-way; :func:`reader` gives an engine whose transactions only read and do not.
PostgreSQL is used through ``postgresql+psycopg://...``. Times are UTC epoch milliseconds in
``*_ms`` columns, as in the event contract.

The guarantees live in constraints, not only in code: ``alerts.alert_id`` is the primary key
(an alert is stored once, however often it is delivered), ``work_orders.incident_id`` is
unique (one work order per incident), and ``outbox.dedupe_key`` is unique (a notification or a
feedback event is queued once).

>>> engine = make_engine("sqlite://")
>>> upgrade(engine)
>>> sorted(Base.metadata.tables) == sorted(table_names(engine))
True
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"
ID = String(64)
READ_ONLY = "meshwatch_read_only"
"""Execution option: this connection only reads (SQLite: ``BEGIN``, not ``BEGIN IMMEDIATE``)."""
_DEFERRED: dict[str, Any] = {"deferrable": True, "initially": "DEFERRED"}
"""Foreign keys are checked at commit, so a batch's rows can be inserted in one flush."""


class Base(DeclarativeBase):
    """Declarative base of every remediation table."""


class AlertRow(Base):
    """An alert as received (its latest version), and the incident it joined."""

    __tablename__ = "alerts"

    alert_id: Mapped[str] = mapped_column(ID, primary_key=True)
    incident_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("incidents.incident_id", **_DEFERRED), index=True)
    district: Mapped[str] = mapped_column(ID)
    device_id: Mapped[str | None] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    est_loss_lph: Mapped[float | None] = mapped_column(Float)
    first_ts_ms: Mapped[int] = mapped_column(BigInteger)
    last_ts_ms: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(ID)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    received_ms: Mapped[int] = mapped_column(BigInteger)


class IncidentRow(Base):
    """Alerts that belong together: one leak, one burst, one broken meter."""

    __tablename__ = "incidents"

    incident_id: Mapped[str] = mapped_column(ID, primary_key=True)
    district: Mapped[str] = mapped_column(ID)
    device_id: Mapped[str | None] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(16))
    severity: Mapped[str] = mapped_column(String(16))
    est_loss_lph: Mapped[float | None] = mapped_column(Float)
    critical_customer: Mapped[bool] = mapped_column(Boolean, default=False)
    first_ts_ms: Mapped[int] = mapped_column(BigInteger)
    last_ts_ms: Mapped[int] = mapped_column(BigInteger)
    alert_count: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16))  # open | closed
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    cleared_ms: Mapped[int | None] = mapped_column(BigInteger)
    """When every alert of the incident had cleared (wall clock); None while one is active."""

    __table_args__ = (Index("ix_incidents_district_state", "district", "state"),
                      Index("ix_incidents_device_id", "device_id"))


class WorkOrderRow(Base):
    """The one work order of an incident, its crew, state, SLA deadlines and outcome."""

    __tablename__ = "work_orders"

    work_order_id: Mapped[str] = mapped_column(ID, primary_key=True)
    incident_id: Mapped[str] = mapped_column(
        ID, ForeignKey("incidents.incident_id", **_DEFERRED), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer)
    crew_id: Mapped[str | None] = mapped_column(ID, index=True)
    skill: Mapped[str] = mapped_column(String(16))
    district: Mapped[str] = mapped_column(ID)
    device_id: Mapped[str | None] = mapped_column(ID)
    outcome: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str | None] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    assigned_ms: Mapped[int | None] = mapped_column(BigInteger)
    acknowledged_ms: Mapped[int | None] = mapped_column(BigInteger)
    started_ms: Mapped[int | None] = mapped_column(BigInteger)
    closed_ms: Mapped[int | None] = mapped_column(BigInteger)
    ack_due_ms: Mapped[int] = mapped_column(BigInteger)
    resolve_due_ms: Mapped[int] = mapped_column(BigInteger)
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    closures: Mapped[int] = mapped_column(Integer, default=0)


class TransitionRow(Base):
    """The audit trail: every change of a work order, who made it, when and why."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    work_order_id: Mapped[str] = mapped_column(
        ID, ForeignKey("work_orders.work_order_id", **_DEFERRED), index=True)
    event: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)


class OutboxRow(Base):
    """A message to send (MQTT or webhook), written in the transaction that caused it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    channel: Mapped[str] = mapped_column(String(16))  # mqtt | webhook
    topic: Mapped[str | None] = mapped_column(String(300))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger)
    sent_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_outbox_pending", "sent_ms", "channel", "next_attempt_ms"),)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE``."""
    if not url.startswith("sqlite"):
        # No server-side prepared statements (psycopg prepares a query on its 5th run): with
        # them PostgreSQL settled on generic plans made while the tables were small
        # (sequential scans) and kept them as the tables grew, so intake slowed down with
        # every batch. Rows go in with COPY, so preparing saved little: the server used less
        # CPU per alert without it. It also suits PgBouncer in transaction mode.
        connect_args = {"prepare_threshold": None, **kwargs.pop("connect_args", {})}
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                           **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        if url not in {"sqlite://", "sqlite:///:memory:"}:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def reader(engine: Engine) -> Engine:
    """The same engine for reads only: on SQLite they then do not queue for the write lock.

    >>> reader(make_engine("sqlite://")).get_execution_options()[READ_ONLY]
    True
    """
    return engine.execution_options(**{READ_ONLY: True})


def is_postgres(engine: Engine) -> bool:
    """Whether ``engine`` talks to PostgreSQL (advisory locks, ``ON CONFLICT``)."""
    return engine.dialect.name == "postgresql"


def bulk_insert(connection: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (column -> value; missing columns are NULL) into ``table``, in bulk.

    PostgreSQL gets ``COPY ... FROM STDIN`` (several times cheaper than an ``executemany`` of
    ``INSERT``, for the server and for psycopg); its errors are raised as SQLAlchemy's
    (``IntegrityError`` for a duplicate key), like those of a normal statement. Elsewhere it is
    one ``executemany``.

    >>> engine = make_engine("sqlite://")
    >>> upgrade(engine)
    >>> with engine.begin() as connection:
    ...     bulk_insert(connection, Base.metadata.tables["outbox"], [
    ...         {"dedupe_key": "k", "channel": "mqtt", "payload": b"{}", "created_ms": 1,
    ...          "attempts": 0, "next_attempt_ms": 1}])
    ...     connection.execute(text("SELECT dedupe_key, topic FROM outbox")).all()
    [('k', None)]
    """
    if not rows:
        return
    if connection.dialect.name != "postgresql":
        connection.execute(table.insert(), [dict(row) for row in rows])
        return
    import psycopg
    from psycopg.types.json import Json

    names = {name for row in rows for name in row}
    columns = [column for column in table.columns if column.key in names]
    json = [isinstance(column.type, JSON) for column in columns]
    statement = (f"COPY {table.name} ({', '.join(column.name for column in columns)}) "
                 "FROM STDIN")
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                values = [row.get(column.key) for column in columns]
                copy.write_row([Json(v) if is_json and v is not None else v
                                for v, is_json in zip(values, json, strict=True)])
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
    finally:
        cursor.close()


def lock_key(name: str) -> int:
    """A stable signed 63-bit number for a PostgreSQL advisory lock named ``name``.

    >>> lock_key("district:dma-01") == lock_key("district:dma-01") != lock_key("district:dma-02")
    True
    """
    return zlib.crc32(name.encode()) | (zlib.adler32(name.encode()) << 31) & 0x3FFF_FFFF_FFFF_FFFF


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent; safe with concurrent starters)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if is_postgres(engine):
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                               {"k": lock_key("meshwatch-remediation-migrations")})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def table_names(engine: Engine) -> list[str]:
    """Tables of the remediation schema present in the database (without Alembic's own)."""
    return [name for name in inspect(engine).get_table_names() if name != "alembic_version"]
