r"""The device registry: which devices exist, where they are and which gateway serves them.

A CSV file with a header row; ``meshwatch simulate --out DIR`` writes one as
``DIR/registry.csv``. Columns (empty cells mean "unknown"):

===============  ==========================================================
column           meaning
===============  ==========================================================
device_id        unique id (letters, digits, ``_.:-``)
device_kind      ``customer_meter``, ``district_meter``, ``pump_station`` or ``other``
customer_type    ``residential``, ``commercial``, ``industrial`` (customer meters)
critical         ``true`` for critical customers (hospitals, dialysis, ...)
site             site id (the site broker the gateway talks to)
district         district (DMA) id
gateway_id       the gateway that may publish for this device
cadence_s        seconds between readings
lat, lon         WGS84 coordinates
===============  ==========================================================

>>> import io
>>> text = (",".join(COLUMNS) + "\n"
...         "mtr-1,customer_meter,residential,false,dma-01,dma-01,gw-1,900,52.1,5.1\n")
>>> registry = parse_registry(io.StringIO(text), source="example")
>>> registry["mtr-1"].gateway_id, registry.summary()
('gw-1', '1 devices in 1 districts behind 1 gateways (1 customer_meter)')
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshwatch.contract.events import Id

COLUMNS = (
    "device_id", "device_kind", "customer_type", "critical", "site", "district",
    "gateway_id", "cadence_s", "lat", "lon",
)
REQUIRED_COLUMNS = ("device_id", "device_kind", "site", "district", "gateway_id", "cadence_s")
MAX_ERRORS_SHOWN = 10


class RegistryError(ValueError):
    """The registry file is missing or invalid; the message names the rows."""


class DeviceKind(StrEnum):
    """What a registered device is."""

    CUSTOMER_METER = "customer_meter"
    DISTRICT_METER = "district_meter"
    PUMP_STATION = "pump_station"
    OTHER = "other"


class CustomerType(StrEnum):
    """The kind of customer behind a meter; demand patterns differ by type."""

    RESIDENTIAL = "residential"
    COMMERCIAL = "commercial"
    INDUSTRIAL = "industrial"


class Device(BaseModel):
    """One registry row (extra columns are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    device_id: Id
    device_kind: DeviceKind
    customer_type: CustomerType | None = None
    critical: bool = False
    site: Id
    district: Id
    gateway_id: Id
    cadence_s: Annotated[int, Field(gt=0, le=86_400)]
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None


class Registry:
    """Devices by id, with look-ups the services need."""

    def __init__(self, devices: list[Device]) -> None:
        self._devices = {device.device_id: device for device in devices}

    def __getitem__(self, device_id: str) -> Device:
        return self._devices[device_id]

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def devices_of_gateway(self, gateway_id: str) -> set[str]:
        """Ids of the devices a gateway may publish for."""
        return {d.device_id for d in self._devices.values() if d.gateway_id == gateway_id}

    def summary(self) -> str:
        """One line: how many devices, districts and gateways, by kind."""
        kinds = Counter(d.device_kind.value for d in self)
        by_kind = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        districts = len({d.district for d in self})
        gateways = len({d.gateway_id for d in self})
        return (
            f"{len(self)} devices in {districts} districts behind {gateways} gateways ({by_kind})"
        )


def load_registry(path: Path) -> Registry:
    """Read and validate a registry CSV file."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return parse_registry(handle, source=str(path))
    except FileNotFoundError:
        msg = f"registry file {path} does not exist (meshwatch simulate --out DIR writes one)"
        raise RegistryError(msg) from None
    except UnicodeDecodeError as exc:
        raise RegistryError(f"registry file {path} is not UTF-8 text: {exc}") from None


def parse_registry(handle: TextIO, source: str) -> Registry:
    """Parse registry CSV text; raises :class:`RegistryError` naming each bad row."""
    reader = csv.DictReader(handle)
    try:
        return _parse_rows(reader, source)
    except csv.Error as exc:
        raise RegistryError(f"{source}: line {reader.line_num}: not valid CSV: {exc}") from None


def _parse_rows(reader: csv.DictReader[str], source: str) -> Registry:
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        msg = f"{source}: missing columns {missing}; expected {', '.join(COLUMNS)}"
        raise RegistryError(msg)
    devices: list[Device] = []
    errors: list[str] = []
    seen: set[str] = set()
    for row in reader:
        line = reader.line_num
        cells = {key: value for key, value in row.items() if key is not None and value != ""}
        try:
            device = Device.model_validate(cells)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            errors.append(f"line {line}: {'.'.join(map(str, first['loc']))}: {first['msg']}")
            continue
        if device.device_id in seen:
            errors.append(f"line {line}: device_id {device.device_id} appears twice")
        seen.add(device.device_id)
        devices.append(device)
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        hidden = len(errors) - MAX_ERRORS_SHOWN
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        raise RegistryError(f"{source}: {len(errors)} bad rows:\n  {shown}{more}")
    return Registry(devices)
