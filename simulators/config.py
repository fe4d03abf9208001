"""Configuration of a simulated fleet: topology, incident rates and communication faults.

Every rate has a realistic default with its reasoning next to it. Rates are expressed
per device (or district, or gateway) per simulated day, or as a per-reading probability,
so a run of any size and length can be reasoned about: the expected number of events is
``rate * count * days``.

>>> config = SimConfig(fleet=FleetConfig(meters=100), days=0.5, seed=3)
>>> config.fleet.district_count
1
>>> config.steps
48
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_START = datetime(2026, 1, 5, tzinfo=UTC)
"""A Monday in winter (northern hemisphere), so weekly and seasonal patterns start cleanly."""

MS_PER_DAY = 86_400_000
MS_PER_MINUTE = 60_000


@dataclass(frozen=True)
class FleetConfig:
    """Size and shape of the network.

    Type mix: in UK and Dutch utilities ~93 % of connections are domestic, most of the
    rest small commercial (shops, offices, schools), and well under 1 % industrial
    (Ofwat and Vewin customer statistics). One district metered area (DMA) of
    the UK style holds 500–3,000 connections (UK Water Industry Research, *Managing
    leakage* report E), hence the default of one district per 1,500 meters. Data
    concentrators of fixed-network AMI serve a few hundred meters each.
    """

    meters: int = 2000
    districts: int | None = None  # None: one per ~1,500 meters
    meters_per_gateway: int = 500
    customer_cadence_s: int = 900  # 15-minute interval data, the AMI norm
    scada_cadence_s: int = 60  # SCADA historians poll district meters every minute
    commercial_fraction: float = 0.06
    industrial_fraction: float = 0.005
    critical_fraction: float = 0.001  # hospitals, care homes, dialysis: one or two a district
    pumps_per_station: int = 3

    @property
    def district_count(self) -> int:
        """The number of districts, derived from the meter count unless given."""
        if self.districts is not None:
            return self.districts
        return max(1, round(self.meters / 1500))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what would be accepted."""
        if self.meters < 1:
            _bad("meters", self.meters, "at least 1")
        if self.district_count < 1 or self.district_count > self.meters:
            _bad("districts", self.district_count, f"between 1 and meters ({self.meters})")
        if self.meters_per_gateway < 1:
            _bad("meters_per_gateway", self.meters_per_gateway, "at least 1")
        if self.customer_cadence_s < 60 or self.customer_cadence_s % self.scada_cadence_s:
            _bad("customer_cadence_s", self.customer_cadence_s,
                 f"at least 60 and a multiple of scada_cadence_s ({self.scada_cadence_s})")
        if self.scada_cadence_s < 1 or 86_400 % self.customer_cadence_s:
            _bad("scada_cadence_s/customer_cadence_s", self.customer_cadence_s,
                 "cadences that divide a day")
        if not 0 <= self.commercial_fraction + self.industrial_fraction <= 1:
            _bad("commercial_fraction + industrial_fraction",
                 self.commercial_fraction + self.industrial_fraction, "between 0 and 1")
        if not 0 <= self.critical_fraction <= self.commercial_fraction:
            _bad("critical_fraction", self.critical_fraction,
                 f"between 0 and commercial_fraction ({self.commercial_fraction})")
        if self.pumps_per_station < 1:
            _bad("pumps_per_station", self.pumps_per_station, "at least 1")


@dataclass(frozen=True)
class IncidentRates:
    """Onset rates of true incidents and meter faults, with their reasoning.

    - Customer-side leaks: 5–10 % of homes leak at any time (AWWA/WRF *Residential End
      Uses of Water* 2016: ~10 % of homes lose ≥ 90 gallons/day); with a mean duration of
      about a month an onset rate of 0.002 per meter per day gives ~5 % prevalence.
    - Network leaks: a DMA of ~20 km of mains sees a few unreported leaks a year
      (0.1–0.3 per km per year), so 0.02 per district per day.
    - Bursts: reported mains bursts run at 0.1–0.3 per km per year in UK/EU networks,
      a few per DMA per year: 0.01 per district per day.
    - Meter faults: mechanical meters stop at 0.5–2 % a year; electronic registers stick
      or drift less often; early battery failure in 10–15-year AMI batteries is rare.
      The rates below add up to ~0.3 faults per meter per year.
    """

    customer_leak_per_meter_day: float = 0.002
    network_leak_per_district_day: float = 0.02
    burst_per_district_day: float = 0.01
    stuck_per_meter_day: float = 0.0002
    stopped_per_meter_day: float = 0.0003
    spikes_per_meter_day: float = 0.0002
    drift_per_meter_day: float = 0.0001
    battery_depletion_per_meter_day: float = 0.0001

    @classmethod
    def none(cls) -> IncidentRates:
        """No incidents at all: a healthy fleet."""
        return cls(**{item.name: 0.0 for item in dataclasses.fields(cls)})


@dataclass(frozen=True)
class CommRates:
    """Communication faults between meters, gateways and the head end.

    - Loss: fixed-network AMI delivers 98–99.8 % of interval reads on first attempt, so a
      per-reading loss of 0.3 % (SCADA on fibre or cellular: 0.05 %).
    - Meter gaps: a meter drops off the network (RF fade, obstruction, firmware hang) about
      once a quarter, for 5 minutes to 3 days (log-uniform).
    - Gateway outages: backhaul of a concentrator fails about once every 3 months for 10
      minutes to 12 hours; the gateway stores and forwards, so its readings arrive late as
      one backlog when the link returns.
    - Duplicates: retransmission after a lost acknowledgement, 0.2 % of readings.
    - Late readings: 0.1 % of readings are retried later, 1 minute to ``late_max_h`` hours,
      so they arrive after their successors (out of order).
    - Clock skew: a device clock drifts or is reset wrongly about once a year, for 1 hour to
      2 days, by 30 seconds to 2 hours either way.
    """

    loss_probability: float = 0.003
    scada_loss_probability: float = 0.0005
    duplicate_probability: float = 0.002
    late_probability: float = 0.001
    late_max_h: float = 6.0
    meter_gap_per_device_day: float = 0.01
    gap_max_h: float = 72.0
    gateway_outage_per_gateway_day: float = 0.01
    outage_max_h: float = 12.0
    clock_skew_per_device_day: float = 0.003
    clock_skew_max_h: float = 48.0

    @classmethod
    def none(cls) -> CommRates:
        """A perfect network: every reading arrives once, on time, correctly stamped."""
        return cls(**{item.name: 0.0 for item in dataclasses.fields(cls)
                      if not item.name.endswith("_max_h")})


@dataclass(frozen=True)
class SimConfig:
    """A complete, reproducible simulation: the same config gives the same readings.

    ``speed`` is simulated seconds per wall second (``None``: as fast as possible).
    """

    fleet: FleetConfig = field(default_factory=FleetConfig)
    incidents: IncidentRates = field(default_factory=IncidentRates)
    comms: CommRates = field(default_factory=CommRates)
    seed: int = 0
    start: datetime = DEFAULT_START
    days: float = 1.0
    speed: float | None = None

    @property
    def start_ms(self) -> int:
        """The start as UTC epoch milliseconds."""
        return int(self.start.timestamp() * 1000)

    @property
    def steps(self) -> int:
        """The number of customer intervals simulated (the engine's time steps)."""
        return math.ceil(self.days * 86_400 / self.fleet.customer_cadence_s - 1e-9)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting and what would be accepted."""
        self.fleet.validate()
        if self.start.tzinfo is None:
            _bad("start", self.start.isoformat(), "a timezone-aware time, e.g. 2026-01-05T00:00Z")
        end = self.start_ms + self.days * MS_PER_DAY
        if not (datetime(2000, 1, 1, tzinfo=UTC) <= self.start
                and end < datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000):
            _bad("start/days", self.start.isoformat(), "a run inside the years 2000..2099")
        if not self.days > 0:
            _bad("days", self.days, "more than 0")
        if self.speed is not None and not self.speed > 0:
            _bad("speed", self.speed, "more than 0 (simulated seconds per wall second)")
        if self.seed < 0:
            _bad("seed", self.seed, "0 or more")
        for group in (self.incidents, self.comms):
            for item in dataclasses.fields(group):
                value = getattr(group, item.name)
                if not (math.isfinite(value) and value >= 0):
                    _bad(item.name, value, "a finite number, 0 or more")
                if item.name.endswith("probability") and value > 0.5:
                    _bad(item.name, value, "a probability of at most 0.5")
                if item.name.endswith("_max_h") and not value > 0:
                    _bad(item.name, value, "more than 0 hours")


def load_rates(path: str | Path, config: SimConfig) -> SimConfig:
    r"""Return ``config`` with rates overridden from a TOML file.

    The file has tables ``[incidents]`` and ``[comms]`` whose keys are the field names of
    :class:`IncidentRates` and :class:`CommRates`. Unknown tables or keys are errors.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
    ...     _ = f.write("[comms]\nloss_probability = 0.01\n")
    >>> load_rates(f.name, SimConfig()).comms.loss_probability
    0.01
    >>> os.remove(f.name)
    """
    try:
        with Path(path).open("rb") as file:
            data: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        msg = f"cannot read rates file {path}: {exc.strerror}"
        raise ValueError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"rates file {path} is not valid TOML: {exc}"
        raise ValueError(msg) from None
    groups = {"incidents": config.incidents, "comms": config.comms}
    unknown = set(data) - set(groups)
    if unknown:
        msg = f"rates file {path}: unknown tables {sorted(unknown)}; use [incidents] and [comms]"
        raise ValueError(msg)
    updated: dict[str, Any] = {}
    for name, table in data.items():
        current = groups[name]
        known = {item.name for item in dataclasses.fields(current)}
        if not isinstance(table, dict) or set(table) - known:
            bad = sorted(set(table) - known) if isinstance(table, dict) else table
            msg = f"rates file {path}: [{name}] has unknown keys {bad}; known: {sorted(known)}"
            raise ValueError(msg)
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                msg = f"rates file {path}: [{name}] {key} must be a number, got {value!r}"
                raise ValueError(msg)
        updated[name] = dataclasses.replace(
            current, **{key: float(value) for key, value in table.items()})
    return dataclasses.replace(config, **updated)


def _bad(name: str, value: object, expected: str) -> None:
    msg = f"{name} is {value!r}; expected {expected}"
    raise ValueError(msg)
