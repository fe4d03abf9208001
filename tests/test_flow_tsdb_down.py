"""The TSDB goes away for a while: the flow back-pressures, catches up and loses nothing.

The outage is 15 s here (not the 60 s of the issue) to keep the suite short; nothing in the
flow depends on its length: the writer retries with back-off capped at
``flow.write_retry_max_s`` (1 s here) for as long as it takes.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from flow_support import (
    CLIENT_ID,
    FlowProcess,
    Load,
    build_load,
    counters,
    create_sessions,
    expected,
    lake_ids,
    publish,
    telemetry,
    wait_for,
    write_config,
    write_registry,
)

from meshwatch.contract import TelemetryBatch, decode

pytestmark = pytest.mark.timeout(120)

OUTAGE_S = 15


def halves(load: Load) -> tuple[Load, Load]:
    first, second = Load(), Load()
    for p, messages in load.messages.items():
        first.messages[p] = messages[:len(messages) // 2]
        second.messages[p] = messages[len(messages) // 2:]
    return first, second


def test_the_flow_waits_for_the_tsdb_and_catches_up(cloud, victoria_metrics, tmp_path) -> None:
    load = build_load(seed=8, devices=32, minutes=60)
    want = expected(load)
    first, second = halves(load)
    lake = tmp_path / "lake"
    config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, lake,
                          write_registry(tmp_path / "registry.csv", load.registered))
    create_sessions(cloud, CLIENT_ID)
    with FlowProcess(config, tmp_path / "flow.log", recovery=tmp_path / "recovery",
                     snapshot_s=0.5) as flow:
        publish(cloud, first)
        wait_for(lambda: len(lake_ids(lake)) > 0 and counters(victoria_metrics).get(
            "received", 0) == sum(want_counts_of(first).values()), 30, "the first half", flow)
        victoria_metrics.stop()
        publish(cloud, second)
        wait_for(lambda: "retrying in" in flow.tail(200), 10, "a failed write", flow)
        stalled_at = len(lake_ids(lake))
        time.sleep(OUTAGE_S)
        # back-pressure: no epoch completes while a write waits, so nothing new is committed
        assert len(lake_ids(lake)) == stalled_at
        assert flow.alive(), flow.tail()
        victoria_metrics.start()
        wait_for(lambda: len(lake_ids(lake)) >= len(load.readings)
                 and counters(victoria_metrics).get("received", 0) >= want.counts["received"],
                 40, "the flow to catch up", flow)
        time.sleep(2)  # idle flush and one more epoch
    assert "failed (" in flow.log.read_text()
    stored = telemetry(victoria_metrics)
    assert set(stored["false"]) == set(want.measured)
    ids = Counter(lake_ids(lake))
    assert set(ids) == load.readings
    assert max(ids.values()) == 1
    got = counters(victoria_metrics)
    assert got["received"] == want.counts["received"]
    assert got["duplicates"] == want.counts["duplicates"]
    assert got["measured"] + got["late"] == len(load.readings)


def want_counts_of(part: Load) -> dict[str, int]:
    """Readings received (byte-identical copies excluded) in a part of the load."""
    received = 0
    for messages in part.messages.values():
        seen: set[bytes] = set()
        for payload in messages:
            if payload in seen:
                continue
            seen.add(payload)
            try:
                received += len(decode(payload, TelemetryBatch).readings)
            except ValueError:
                continue
    return {"received": received}
