"""The dataflow end to end: cloud mosquitto → ``meshwatch flow`` → VictoriaMetrics, lake, DLQ."""

from __future__ import annotations

from collections import Counter

import pytest
from flow_support import (
    CLIENT_ID,
    FlowProcess,
    build_load,
    counters,
    create_sessions,
    dead_letter_watch,
    expected,
    lake_ids,
    publish,
    telemetry,
    wait_for,
    write_config,
    write_registry,
)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_flow_stores_every_reading_once_fills_gaps_and_dead_letters_garbage(
        workers, cloud, victoria_metrics, tmp_path) -> None:
    load = build_load(seed=6)
    want = expected(load)
    for path in ("late", "imputed", "long_gaps", "duplicates"):  # the load covers every path
        assert want.counts[path] > 0, path
    registry = write_registry(tmp_path / "registry.csv", load.registered)
    lake = tmp_path / "lake"
    config = write_config(tmp_path / "flow.toml", cloud, victoria_metrics, lake, registry)
    create_sessions(cloud, CLIENT_ID)
    with dead_letter_watch(cloud) as dead_letters:
        publish(cloud, load)  # all of it waits in the sessions: the flow sees broker order
        with FlowProcess(config, tmp_path / "flow.log", workers=workers) as flow:
            wait_for(lambda: len(telemetry(victoria_metrics)["false"]) >= len(want.measured)
                     and counters(victoria_metrics).get("received", 0)
                     == want.counts["received"], 60, "every reading in VictoriaMetrics", flow)
            wait_for(lambda: len(dead_letters.reasons()) >= len(load.garbage), 20,
                     "the dead letters", flow)
            wait_for(lambda: len(lake_ids(lake)) >= len(load.readings), 20, "the lake", flow)
            # the counters are written as they stand every few seconds: `received` is final
            # before `measured` (readings still waiting for the watermark)
            wait_for(lambda: counters(victoria_metrics) == want.counts, 20,
                     f"the flow's counters to reach {want.counts}", flow)
            assert flow.alive(), flow.tail()
        stored = telemetry(victoria_metrics)
        assert dead_letters.reasons() == want.dead_letter_reasons
    # every reading exactly once per (series, time), with its value
    assert {k: v[0] for k, v in stored["false"].items()} == want.measured
    assert {k: v[0] for k, v in stored["true"].items()} == pytest.approx(want.imputed)
    twice = [k for series in stored.values() for k, v in series.items() if len(v) > 1]
    assert not twice, f"points written more than once: {twice[:5]}"
    # the flow's own counters (snapshotted state) and its ledger
    assert counters(victoria_metrics) == want.counts
    ledger = {field: sum(int(max(zip(s["timestamps"], s["values"], strict=True))[1])
                         for s in victoria_metrics.export(f'mw_ledger_{field}{{hop="flow"}}'))
              for field in ("received", "forwarded", "duplicates", "dropped")}
    assert ledger == {"received": want.counts["received"], "dropped": 0,
                      "duplicates": want.counts["duplicates"],
                      "forwarded": want.counts["measured"] + want.counts["late"]}
    ids = Counter(lake_ids(lake))
    assert set(ids) == load.readings
    assert max(ids.values()) == 1
