"""Topology and registry of a simulated water network: districts, gateways and devices.

Each district (DMA) has an inlet district meter and a pump station, both behind one SCADA
gateway, and customer meters behind data concentrators of up to ``meters_per_gateway``
meters. Devices are numbered so that every gateway's meters are contiguous: customer
meters first (by district, then gateway), then the district meters, then the pump stations.
Arrays indexed by that number (``device_ids``, ``gateway_of``...) describe the whole fleet.

Ids follow :data:`meshwatch.contract.events.ID_PATTERN`: ``dma-01``, ``dma-01-inlet``,
``dma-01-pump``, ``dma-01-scada``, ``dma-01-gw-001``, ``mtr-0000001``. The site of every
device is its district.

>>> import numpy as np

from meshwatch import registry
>>> fleet = Fleet.build(FleetConfig(meters=1200, districts=2), np.random.default_rng(1))
>>> fleet.customer_count, fleet.district_ids, fleet.device_count
(1200, ['dma-01', 'dma-02'], 1204)
>>> str(fleet.device_ids[fleet.inlet_device(1)]), str(fleet.gateway_ids[fleet.gateway_of[0]])
('dma-02-inlet', 'dma-01-gw-001')
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from meshwatch import registry
from simulators.config import FleetConfig


class DeviceKind(IntEnum):
    """What a device is; the value indexes :data:`KIND_NAMES`."""

    CUSTOMER_METER = 0
    DISTRICT_METER = 1
    PUMP_STATION = 2


KIND_NAMES = tuple(registry.DeviceKind(name).value
                   for name in ("customer_meter", "district_meter", "pump_station"))


class CustomerType(IntEnum):
    """Customer classes with different demand; -1 in ``customer_type`` means not a customer."""

    RESIDENTIAL = 0
    COMMERCIAL = 1
    INDUSTRIAL = 2


CUSTOMER_TYPE_NAMES = tuple(registry.CustomerType(name).value
                            for name in ("residential", "commercial", "industrial"))


class Profile(IntEnum):
    """Diurnal demand profile of a customer (see :mod:`simulators.demand`)."""

    RESIDENTIAL = 0
    OFFICE_HOURS = 1  # shops, offices, schools
    ROUND_THE_CLOCK = 2  # night-shift businesses, hospitals
    TWO_SHIFTS = 3  # industry 06:00-22:00 on weekdays
    CONTINUOUS_PROCESS = 4  # industry running 24/7


NIGHT_SHIFT_SHARE = {CustomerType.COMMERCIAL: 0.10, CustomerType.INDUSTRIAL: 0.40}
"""Share of businesses that run around the clock: a legitimate night flow, not a leak."""

CENTRE_LAT, CENTRE_LON = 51.45, -0.97  # a fictional town in southern England (UTC)
DISTRICT_SPACING_DEG = 0.02  # ~2 km between district centres
METER_SCATTER_DEG = 0.004  # ~400 m around the district centre


@dataclass(frozen=True, eq=False)
class Fleet:
    """Every device of the network and how they are grouped; build with :meth:`build`."""

    district_ids: list[str]
    gateway_ids: np.ndarray  # str, one per gateway
    gateway_district: np.ndarray  # int32 per gateway
    device_ids: np.ndarray  # str, one per device
    kind: np.ndarray  # int8 DeviceKind per device
    district_of: np.ndarray  # int32 per device
    gateway_of: np.ndarray  # int32 per device
    customer_type: np.ndarray  # int8 CustomerType per device, -1 for district devices
    profile: np.ndarray  # int8 Profile per customer meter
    critical: np.ndarray  # bool per device
    lat: np.ndarray
    lon: np.ndarray
    customer_count: int

    @property
    def device_count(self) -> int:
        """The number of devices of every kind."""
        return len(self.device_ids)

    @property
    def district_count(self) -> int:
        """The number of districts."""
        return len(self.district_ids)

    def inlet_device(self, district: int) -> int:
        """The device index of a district's inlet meter."""
        return self.customer_count + district

    def pump_device(self, district: int) -> int:
        """The device index of a district's pump station."""
        return self.customer_count + self.district_count + district

    def scada_gateway(self, district: int) -> int:
        """The gateway index of a district's SCADA gateway (the last gateways)."""
        return len(self.gateway_ids) - self.district_count + district

    def customer_gateway_bounds(self) -> np.ndarray:
        """Start index of each customer gateway's meters, plus the end: ``len = gateways+1``."""
        customer_gateways = len(self.gateway_ids) - self.district_count
        return np.searchsorted(self.gateway_of[: self.customer_count],
                               np.arange(customer_gateways + 1))

    def cadence_s(self, config: FleetConfig) -> np.ndarray:
        """Each device's reading interval in seconds: ``config``'s customer or SCADA cadence."""
        return np.where(self.kind == DeviceKind.CUSTOMER_METER, config.customer_cadence_s,
                        config.scada_cadence_s)

    @classmethod
    def build(cls, config: FleetConfig, rng: np.random.Generator) -> Fleet:
        """Lay out districts, gateways and meters reproducibly from ``rng``."""
        config.validate()
        n, n_districts = config.meters, config.district_count
        width = max(2, len(str(n_districts)))
        district_ids = [f"dma-{d + 1:0{width}d}" for d in range(n_districts)]
        weights = rng.uniform(0.8, 1.2, n_districts)
        sizes = 1 + np.floor(weights / weights.sum() * (n - n_districts)).astype(np.int64)
        sizes[: n - sizes.sum()] += 1
        customer_district = np.repeat(np.arange(n_districts, dtype=np.int32), sizes)

        gateway_names: list[str] = []
        gateway_district: list[int] = []
        customer_gateway = np.empty(n, np.int32)
        start = 0
        for d, size in enumerate(sizes.tolist()):
            count = -(-size // config.meters_per_gateway)
            local = np.arange(size) * count // size  # spread meters evenly over gateways
            customer_gateway[start:start + size] = len(gateway_names) + local
            gateway_names += [f"{district_ids[d]}-gw-{g + 1:03d}" for g in range(count)]
            gateway_district += [d] * count
            start += size
        scada_first = len(gateway_names)
        gateway_names += [f"{name}-scada" for name in district_ids]
        gateway_district += list(range(n_districts))

        ctype, profile, critical = _customer_mix(config, rng)
        id_width = max(7, len(str(n)))
        device_ids = np.array(
            [f"mtr-{i + 1:0{id_width}d}" for i in range(n)]
            + [f"{name}-inlet" for name in district_ids]
            + [f"{name}-pump" for name in district_ids], dtype=object)
        districts = np.arange(n_districts, dtype=np.int32)
        kind = np.concatenate([np.full(n, DeviceKind.CUSTOMER_METER, np.int8),
                               np.full(n_districts, DeviceKind.DISTRICT_METER, np.int8),
                               np.full(n_districts, DeviceKind.PUMP_STATION, np.int8)])
        side = int(np.ceil(np.sqrt(n_districts)))
        centre_lat = CENTRE_LAT + (districts // side - side / 2) * DISTRICT_SPACING_DEG
        centre_lon = CENTRE_LON + (districts % side - side / 2) * DISTRICT_SPACING_DEG * 1.6
        all_district = np.concatenate([customer_district, districts, districts])
        scatter = rng.normal(0.0, METER_SCATTER_DEG, (2, n))
        lat = centre_lat[all_district] + np.concatenate([scatter[0], np.zeros(2 * n_districts)])
        lon = centre_lon[all_district] + np.concatenate(
            [scatter[1] * 1.6, np.zeros(2 * n_districts)])
        return cls(
            district_ids=district_ids,
            gateway_ids=np.array(gateway_names, dtype=object),
            gateway_district=np.array(gateway_district, np.int32),
            device_ids=device_ids,
            kind=kind,
            district_of=all_district.astype(np.int32),
            gateway_of=np.concatenate([customer_gateway, scada_first + districts,
                                       scada_first + districts]).astype(np.int32),
            customer_type=np.concatenate([ctype, np.full(2 * n_districts, -1, np.int8)]),
            profile=profile,
            critical=np.concatenate([critical, np.zeros(2 * n_districts, bool)]),
            lat=np.round(lat, 6),
            lon=np.round(lon, 6),
            customer_count=n,
        )


def _customer_mix(
    config: FleetConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw customer types, profiles and critical flags for every customer meter."""
    n = config.meters
    shares = [1 - config.commercial_fraction - config.industrial_fraction,
              config.commercial_fraction, config.industrial_fraction]
    ctype = rng.choice(3, size=n, p=shares).astype(np.int8)
    profile = np.full(n, Profile.RESIDENTIAL, np.int8)
    commercial = ctype == CustomerType.COMMERCIAL
    industrial = ctype == CustomerType.INDUSTRIAL
    night = rng.random(n)
    profile[commercial] = np.where(
        night[commercial] < NIGHT_SHIFT_SHARE[CustomerType.COMMERCIAL],
        Profile.ROUND_THE_CLOCK, Profile.OFFICE_HOURS)
    profile[industrial] = np.where(
        night[industrial] < NIGHT_SHIFT_SHARE[CustomerType.INDUSTRIAL],
        Profile.CONTINUOUS_PROCESS, Profile.TWO_SHIFTS)
    critical = np.zeros(n, bool)
    candidates = np.flatnonzero(commercial)
    wanted = min(len(candidates), round(config.critical_fraction * n))
    if config.critical_fraction > 0 and candidates.size:
        wanted = max(wanted, 1)
    chosen = rng.choice(candidates, size=wanted, replace=False) if wanted else candidates[:0]
    critical[chosen] = True
    profile[chosen] = Profile.ROUND_THE_CLOCK  # hospitals never close
    return ctype, profile, critical
