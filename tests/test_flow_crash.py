"""Crash safety: ``kill -9`` the flow at random moments, restart it with recovery, lose nothing.

VictoriaMetrics keeps a replayed write as a second raw sample with the same timestamp (a
query sees one value), so "no duplicate" is checked on the flow's own state: its counters
(snapshotted with the epoch) and its lake, whose files are numbered by epoch.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from flow_support import (
    CLIENT_ID,
    FlowProcess,
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

pytestmark = pytest.mark.timeout(120)

KILLS = 6


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(cloud, victoria_metrics,
                                                               tmp_path) -> None:
    rng = random.Random(20261123)
    load = build_load(seed=7, devices=48, minutes=90)
    want = expected(load)
    registry = write_registry(tmp_path / "registry.csv", load.registered)
    lake = tmp_path / "lake"
    # idle_flush_s longer than any pause of the publisher or restart: the result is then the
    # same as without crashes, whatever epoch a message falls in
    config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, lake, registry,
                          idle_flush_s=8)
    create_sessions(cloud, CLIENT_ID)
    flow = FlowProcess(config, tmp_path / "flow.log", workers=2,
                       recovery=tmp_path / "recovery", snapshot_s=0.5).start()
    publisher = threading.Thread(
        target=publish, args=(cloud, load), kwargs={"pause_every": 8, "pause_s": 0.25})
    publisher.start()
    kills = []

    def crash() -> None:
        kills.append(round(time.monotonic(), 2))
        flow.kill()
        time.sleep(rng.uniform(0.0, 0.5))
        flow.start()

    try:
        for _ in range(KILLS - 1):  # while the load comes in
            time.sleep(rng.uniform(0.8, 3.0))
            crash()
        publisher.join(60)
        assert not publisher.is_alive()
        # once more after the last message, with readings still waiting for the watermark:
        # the restarted flow must release them although no input comes any more
        time.sleep(rng.uniform(1.0, 2.0))
        crash()
        wait_for(lambda: counters(victoria_metrics).get("received", 0)
                 >= want.counts["received"] and len(lake_ids(lake)) >= len(load.readings),
                 45, "the flow to catch up after the last restart", flow)
        time.sleep(10)  # idle flush (8 s), then one more epoch: nothing more may come
        assert flow.alive(), flow.tail()
    finally:
        flow.kill()
    assert len(kills) >= 5
    log = (tmp_path / "flow.log").read_text()
    assert log.count("=== start") == KILLS + 1
    # exactly once in the flow's own state and ledger
    assert counters(victoria_metrics) == want.counts
    ids = Counter(lake_ids(lake))
    assert set(ids) == load.readings
    assert [k for k, n in ids.items() if n > 1] == []
    # nothing missing (and nothing extra) in the TSDB
    stored = telemetry(victoria_metrics)
    assert set(stored["false"]) == set(want.measured)
    assert set(stored["true"]) == set(want.imputed)
