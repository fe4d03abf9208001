"""The head of the pipeline test: a simulated fleet's gateways, each an edge agent, in a process.

Run as a script (``python tests/pipeline_support.py BROKER_URL OUT_DIR``), it builds the
detection tests' fleet (:func:`detect_support.eval_settings`), starts one
:class:`~edge_agent.agent.EdgeAgent` per gateway on the site broker (durable outbox, no
edge model: no edge alerts), hands every simulated block to its gateway's agent in
delivery order, as fast as the outboxes take them, closes the agents (each drains its
outbox) and prints a JSON line: readings accepted per gateway, and whether every outbox
drained. A process of its own, as on a real site, so the agents' threads do not share
the test's GIL.

In the test's own process, :func:`truth` runs the same seeded simulator again: what it
delivered (each reading's ``(device, seq)``, event time and metrics) and what its
communication faults lost on the way (``lost`` and meter ``gap`` records).

>>> want = truth(eval_settings(meters=40, days=0.2))
>>> len(want.delivered) > 0, want.delivered.keys().isdisjoint(want.lost)
(True, True)
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from detect_support import eval_settings

from models.evaluate import EvalSettings
from simulators import CommFaultLog, FleetSimulator

__all__ = ["Truth", "expected_imputed", "main", "truth"]


@dataclass
class Truth:
    """What the simulator produced, keyed by ``(device, ts_ms)``."""

    delivered: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)
    """Every delivered reading's metrics (finite values only, as the wire carries them)."""
    seqs: set[tuple[str, int]] = field(default_factory=set)
    """Every delivered reading's ``(device, seq)``."""
    lost: set[tuple[str, int]] = field(default_factory=set)
    """Readings lost to communication faults (``lost``, meter ``gap``): never delivered."""
    cadence_ms: dict[str, int] = field(default_factory=dict)


def truth(settings: EvalSettings) -> Truth:
    """Run the simulator of ``settings``; see :class:`Truth`."""
    logs: list[CommFaultLog] = []
    config = settings.sim_config()
    simulator = FleetSimulator(config, on_comm_faults=logs.append)
    out = Truth()
    for block in simulator:
        names = list(block.metrics)
        columns = [block.metrics[name].tolist() for name in names]
        for i, (device, ts, seq) in enumerate(zip(block.device_ids.tolist(),
                                                  block.ts_ms.tolist(), block.seq.tolist(),
                                                  strict=True)):
            out.delivered[(device, ts)] = {name: column[i] for name, column
                                           in zip(names, columns, strict=True)
                                           if math.isfinite(column[i])}
            out.seqs.add((device, seq))
    log = CommFaultLog.concat(logs)
    ids = simulator.fleet.device_ids
    out.lost = {(str(ids[d]), ts) for d, ts in zip(log.device.tolist(), log.ts_ms.tolist(),
                                                   strict=True)}
    customer = config.fleet.customer_cadence_s * 1000
    scada = config.fleet.scada_cadence_s * 1000
    for device, kind in zip(ids.tolist(), simulator.fleet.kind.tolist(), strict=True):
        out.cadence_ms[device] = customer if kind == 0 else scada
    return out


def expected_imputed(want: Truth, max_intervals: int) -> set[tuple[str, int]]:
    """The ``(device, ts_ms)`` that gap filling must impute: the missing cadence steps
    between two delivered readings at most ``max_intervals`` cadences apart."""
    times: dict[str, list[int]] = defaultdict(list)
    for device, ts in want.delivered:
        times[device].append(ts)
    out = set()
    for device, stamps in times.items():
        cadence = want.cadence_ms[device]
        stamps.sort()
        for before, after in itertools.pairwise(stamps):
            intervals = round((after - before) / cadence)
            if 2 <= intervals <= max_intervals:
                out.update((device, before + k * cadence) for k in range(1, intervals))
    return out


def main(broker_url: str, out_dir: Path) -> int:
    """Run every gateway's agent over the fleet (see the module doc); 0 if all drained."""
    from edge_agent.agent import AgentSettings, EdgeAgent

    settings = eval_settings()
    simulator = FleetSimulator(settings.sim_config())
    fleet = simulator.fleet
    agents: dict[str, EdgeAgent] = {}
    for gateway, district in zip(fleet.gateway_ids.tolist(), fleet.gateway_district.tolist(),
                                 strict=True):
        agents[gateway] = EdgeAgent(AgentSettings(
            site=fleet.district_ids[district], gateway_id=gateway, broker_url=broker_url,
            outbox_path=out_dir / f"{gateway}.db", outbox_synchronous="NORMAL",
            backlog_rate_per_s=None, max_batch_readings=200)).start()
    accepted: dict[str, int] = defaultdict(int)
    for block in simulator:
        if not agents[block.gateway_id].submit_block(block):
            break
        accepted[block.gateway_id] += len(block)
    drained = {gateway: agent.close(timeout_s=120) for gateway, agent in agents.items()}
    print(json.dumps({"accepted": accepted, "drained": drained}), flush=True)
    return 0 if all(drained.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
