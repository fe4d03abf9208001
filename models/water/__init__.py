"""Water detectors: customer leaks, district leaks, bursts, meter faults and silent devices.

Each module holds a fleet class (columnar state of many streams, the batch path) and a
per-stream :class:`~models.anomaly.base.AnomalyDetector` over the same code; see
:mod:`models.water.base`.
"""

from models.water.burst import BurstDetector, BurstFleet, BurstSettings
from models.water.customer_leak import (
    CustomerLeakDetector,
    CustomerLeakFleet,
    CustomerLeakSettings,
)
from models.water.district_leak import (
    DistrictLeakDetector,
    DistrictLeakFleet,
    DistrictLeakSettings,
)
from models.water.sensor_faults import (
    FAULT_NAMES,
    SensorFaultDetector,
    SensorFaultFleet,
    SensorFaultSettings,
)
from models.water.silence import SilenceDetector, SilenceFleet, SilenceSettings

__all__ = [
    "FAULT_NAMES",
    "BurstDetector",
    "BurstFleet",
    "BurstSettings",
    "CustomerLeakDetector",
    "CustomerLeakFleet",
    "CustomerLeakSettings",
    "DistrictLeakDetector",
    "DistrictLeakFleet",
    "DistrictLeakSettings",
    "SensorFaultDetector",
    "SensorFaultFleet",
    "SensorFaultSettings",
    "SilenceDetector",
    "SilenceFleet",
    "SilenceSettings",
]
