"""Which gateway may publish for which device.

A gateway is named by ``(site, gateway_id)``: the levels of the topic it published on, which
the site broker's ACL ties to the gateway's account. Ownership comes from two sources:

1. **The registry wins.** A device in the registry belongs to its ``(site, gateway_id)`` row
   and to no one else, whatever births say.
2. **Births fill the gaps.** A ``DeviceStatus`` birth lists the devices a gateway serves. Devices
   that are *not* in the registry and not yet claimed by another live gateway are granted to it.
   A later birth of the same gateway replaces its claims (devices it no longer lists are
   released); its death releases them all. A device claimed by another gateway's birth stays
   with the first claimant until that gateway releases it, so a second gateway cannot take
   over a device by announcing it. Heartbeats change nothing.

Everything else is refused; the router dead-letters refused readings as ``unauthorized_device``.

>>> from meshwatch.contract import DeviceStatus
>>> from meshwatch.registry import Registry
>>> identity = Identity(Registry([]))
>>> birth = DeviceStatus(site="s1", gateway_id="gw-1", state="birth", sent_ms=1767225600000,
...                      devices=["m1", "m2"])
>>> identity.observe(birth)
Claims(granted=['m1', 'm2'], refused=[])
>>> identity.authorize("s1", "gw-1", ["m1", "m9", "m2"])
(['m1', 'm2'], ['m9'])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from meshwatch.contract import DeviceState, DeviceStatus
from meshwatch.registry import Registry

Gateway = tuple[str, str]
"""``(site, gateway_id)``."""


class Claims(NamedTuple):
    """What a birth was granted: devices now owned by the gateway, and devices refused."""

    granted: list[str]
    refused: list[str]


class Identity:
    r"""Device ownership from a registry and from gateway births (policy in the module doc).

    ``authorize`` costs one dict look-up per device id.

    >>> import io
    >>> from meshwatch.registry import COLUMNS, parse_registry
    >>> row = "mtr-1,customer_meter,,false,s1,dma-01,gw-1,900,,\n"
    >>> identity = Identity(parse_registry(io.StringIO(",".join(COLUMNS) + "\n" + row), "x"))
    >>> identity.authorize("s1", "gw-2", ["mtr-1"])
    ([], ['mtr-1'])
    >>> identity.owner("mtr-1")
    ('s1', 'gw-1')
    """

    def __init__(self, registry: Registry) -> None:
        self._registered: dict[str, Gateway] = {
            d.device_id: (d.site, d.gateway_id) for d in registry
        }
        self._owners: dict[str, Gateway] = dict(self._registered)
        self._claims: dict[Gateway, set[str]] = {}

    def owner(self, device_id: str) -> Gateway | None:
        """The ``(site, gateway_id)`` that may publish for ``device_id``, or ``None``."""
        return self._owners.get(device_id)

    def authorize(
        self, site: str, gateway_id: str, device_ids: Iterable[str]
    ) -> tuple[list[str], list[str]]:
        """Split ``device_ids`` into those the gateway may publish for and the rest (in order)."""
        me = (site, gateway_id)
        owners = self._owners
        allowed: list[str] = []
        refused: list[str] = []
        for device_id in device_ids:
            (allowed if owners.get(device_id) == me else refused).append(device_id)
        return allowed, refused

    def observe(self, status: DeviceStatus) -> Claims:
        """Apply a gateway's birth or death; heartbeats change nothing."""
        me = (status.site, status.gateway_id)
        if status.state is DeviceState.HEARTBEAT:
            return Claims([], [])
        self._release(me)
        if status.state is DeviceState.DEATH:
            return Claims([], [])
        granted: list[str] = []
        refused: list[str] = []
        claims: set[str] = set()
        for device_id in dict.fromkeys(status.devices):
            owner = self._owners.get(device_id)
            if owner is None or owner == me:
                self._owners[device_id] = me
                granted.append(device_id)
                if device_id not in self._registered:
                    claims.add(device_id)
            else:
                refused.append(device_id)
        self._claims[me] = claims
        return Claims(granted, refused)

    def _release(self, gateway: Gateway) -> None:
        for device_id in self._claims.pop(gateway, ()):
            if self._owners.get(device_id) == gateway:
                del self._owners[device_id]
