"""Fixtures that run real servers; the controllers live in ``servers.py``.

- ``mosquitto``, ``victoria_metrics``: a fresh server per test (they start in ~0.1 s).
- ``influxdb``, ``postgres``: one server per session; tests get isolation from
  ``influxdb_db`` (a fresh database name) and ``postgres_db`` (a fresh database's URL).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import InfluxDB1, Mosquitto, Pki, PostgreSQL, VictoriaMetrics, make_pki

from models.edge.train import TrainedModel, TrainSettings, train_edge_model, write_package


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto broker (persistence on, no QoS1 drop limits); ``.url``."""
    with Mosquitto(tmp_path) as server:
        yield server


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Mosquitto]:
    """A second mosquitto, the cloud broker, for tests of what crosses two brokers."""
    base = tmp_path / "cloud"
    base.mkdir()
    with Mosquitto(base) as server:
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, a server certificate for 127.0.0.1, and an unrelated CA (openssl CLI)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def victoria_metrics(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A running, empty VictoriaMetrics; ``.url`` takes Influx line protocol and PromQL."""
    with VictoriaMetrics(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    """One influxd 1.x for the session; use ``influxdb_db`` for a database of your own."""
    with InfluxDB1(tmp_path_factory.mktemp("influxdb")) as server:
        yield server


@pytest.fixture
def influxdb_db(influxdb: InfluxDB1) -> Iterator[str]:
    """Name of a fresh database on the session's influxd, dropped after the test."""
    if not influxdb.running:  # a previous test stopped or killed it
        influxdb.start()
    name = _unique("test")
    influxdb.create_database(name)
    yield name
    if influxdb.running:
        influxdb.drop_database(name)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgreSQL]:
    """One PostgreSQL for the session; use ``postgres_db`` for a database of your own."""
    with PostgreSQL(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_db(postgres: PostgreSQL) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database on the session's PostgreSQL, dropped after the test.

    Dispose of your engines before the test ends; the drop disconnects leftover sessions.
    """
    if not postgres.running:  # a previous test stopped or killed it
        postgres.start()
    name = _unique("test")
    url = postgres.create_database(name)
    yield url
    if postgres.running:
        postgres.drop_database(name)


SMALL_EDGE_TRAINING = TrainSettings(meters=400, days=3, districts=4, seed=1_000_011)
"""A small but real edge-model training run (a few seconds)."""


@pytest.fixture(scope="session")
def trained_edge_model() -> TrainedModel:
    """An edge model trained once per session on simulated data."""
    return train_edge_model(SMALL_EDGE_TRAINING)


@pytest.fixture(scope="session")
def edge_model_dir(trained_edge_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory,
                   ) -> Path:
    """A model package directory (``model.onnx`` + ``manifest.json``) of that model."""
    return write_package(trained_edge_model, tmp_path_factory.mktemp("edge-model") / "pkg")
