"""Synthetic smart-water fleets: the load generator and the ground truth of Meshwatch.

Iterate over a :class:`FleetSimulator` to get :class:`ReadingBlock` objects (one gateway's
delivery, as numpy columns) in delivery order; :func:`simulators.output.write_run` writes a
run to files; :class:`simulators.publish.FleetPublisher` publishes blocks to MQTT;
``meshwatch simulate`` drives it all. Importing this package needs only numpy: the writers
(pyarrow) and the publisher (paho-mqtt) are imported from their own modules.

>>> from simulators import FleetConfig, FleetSimulator, SimConfig
>>> simulator = FleetSimulator(SimConfig(fleet=FleetConfig(meters=20), days=0.1, seed=5))
>>> first = next(iter(simulator))
>>> first.kind, first.site
('district_meter', 'dma-01')
"""

from simulators.block import ReadingBlock, Readings
from simulators.comms import CommFault, CommFaultLog
from simulators.config import CommRates, FleetConfig, IncidentRates, SimConfig, load_rates
from simulators.engine import FleetSimulator, RunStats
from simulators.fleet import Fleet
from simulators.truth import Episode

__all__ = [
    "CommFault",
    "CommFaultLog",
    "CommRates",
    "Episode",
    "Fleet",
    "FleetConfig",
    "FleetSimulator",
    "IncidentRates",
    "ReadingBlock",
    "Readings",
    "RunStats",
    "SimConfig",
    "load_rates",
]
