"""Every MQTT topic of the mesh, built and parsed in one place.

All topics start with ``mw/v1``. Ids used as topic levels must match
:data:`meshwatch.contract.events.ID_PATTERN`, so they never contain ``/``,
``+`` or ``#``.

======================================================  ============================================
topic                                                   carries
======================================================  ============================================
``mw/v1/site/{site}/gw/{gateway}/telemetry``            TelemetryBatch, gateway → site broker
``mw/v1/site/{site}/gw/{gateway}/scores``               EdgeScore, from the edge model
``mw/v1/site/{site}/gw/{gateway}/alerts``               Alert raised at the edge
``mw/v1/site/{site}/gw/{gateway}/status``               DeviceStatus, retained: birth/death/beat
``mw/v1/site/{site}/gw/{gateway}/model``                ModelAnnouncement for the gateway, retained
``mw/v1/site/{site}/gw/{gateway}/raw/{device}``         RawReading, a local device → its gateway
``mw/v1/site/{site}/gw/{gateway}/deadletter/{reason}``  DeadLetter of the gateway's own input
``mw/v1/mesh/telemetry/{partition}``                    TelemetryBatch, cloud mesh, by partition
``mw/v1/mesh/scores/{partition}``                       EdgeScore, cloud mesh, by partition
``mw/v1/alerts/{district}/{kind}``                      Alert from the dataflows
``mw/v1/feedback/{district}``                           Feedback from remediation
``mw/v1/crews/{crew}/work_orders``                      WorkOrderEvent to one crew, from remediation
``mw/v1/deadletter/{reason}``                           DeadLetter
``mw/v1/bridge/{bridge}/heartbeat``                     a bridge's end-to-end liveness probe
======================================================  ============================================

>>> site_telemetry("dma-01", "gw-07")
'mw/v1/site/dma-01/gw/gw-07/telemetry'
>>> parse("mw/v1/mesh/telemetry/3")
Topic(kind='mesh_telemetry', params={'partition': '3'})
>>> partition_of("mtr-000001", 8)
5
>>> parse(crew_work_orders("crew-north"))
Topic(kind='crew_work_orders', params={'crew': 'crew-north'})
"""

from __future__ import annotations

import re
import zlib
from typing import NamedTuple

from meshwatch.contract.errors import ContractError, Reason
from meshwatch.contract.events import ID_PATTERN

PREFIX = "mw/v1"

_ID = re.compile(ID_PATTERN)

# kind -> template; the one table that both building and parsing use.
TEMPLATES: dict[str, str] = {
    "site_telemetry": PREFIX + "/site/{site}/gw/{gateway}/telemetry",
    "site_scores": PREFIX + "/site/{site}/gw/{gateway}/scores",
    "site_alerts": PREFIX + "/site/{site}/gw/{gateway}/alerts",
    "site_status": PREFIX + "/site/{site}/gw/{gateway}/status",
    "site_model": PREFIX + "/site/{site}/gw/{gateway}/model",
    "site_raw": PREFIX + "/site/{site}/gw/{gateway}/raw/{device}",
    "site_dead_letter": PREFIX + "/site/{site}/gw/{gateway}/deadletter/{reason}",
    "mesh_telemetry": PREFIX + "/mesh/telemetry/{partition}",
    "mesh_scores": PREFIX + "/mesh/scores/{partition}",
    "alerts": PREFIX + "/alerts/{district}/{kind}",
    "feedback": PREFIX + "/feedback/{district}",
    "crew_work_orders": PREFIX + "/crews/{crew}/work_orders",
    "dead_letter": PREFIX + "/deadletter/{reason}",
    "bridge_heartbeat": PREFIX + "/bridge/{bridge}/heartbeat",
}


class Topic(NamedTuple):
    """A parsed topic: its kind (a key of :data:`TEMPLATES`) and its levels by name."""

    kind: str
    params: dict[str, str]


def build(kind: str, /, **params: str | int) -> str:
    """Build the topic of ``kind``; raises ``ValueError`` for an unknown kind or a bad level.

    >>> build("alerts", district="dma-01", kind="leak")
    'mw/v1/alerts/dma-01/leak'
    >>> build("alerts", district="dma-01")
    Traceback (most recent call last):
    ...
    ValueError: topic 'alerts' needs levels ['district', 'kind'], got ['district']
    """
    template = TEMPLATES.get(kind)
    if template is None:
        msg = f"unknown topic kind {kind!r}; known kinds: {', '.join(TEMPLATES)}"
        raise ValueError(msg)
    names = _level_names(template)
    if sorted(params) != sorted(names):
        msg = f"topic {kind!r} needs levels {names}, got {sorted(params)}"
        raise ValueError(msg)
    for name, value in params.items():
        if not _ID.match(str(value)):
            msg = f"topic level {name}={value!r} must match {ID_PATTERN}"
            raise ValueError(msg)
    return template.format(**params)


def parse(topic: str) -> Topic:
    """Parse a concrete topic; raises :class:`ContractError` (``bad_topic``) if it is not ours."""
    levels = topic.split("/")
    for kind, template in TEMPLATES.items():
        pattern = template.split("/")
        if len(pattern) != len(levels):
            continue
        params: dict[str, str] = {}
        for want, got in zip(pattern, levels, strict=True):
            if want.startswith("{"):
                if not _ID.match(got):
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return Topic(kind, params)
    raise ContractError(Reason.BAD_TOPIC, f"not a Meshwatch v1 topic: {topic[:200]!r}")


def subscription(kind: str, /, **params: str | int) -> str:
    """A subscription filter for ``kind``: levels not given become ``+``.

    >>> subscription("site_telemetry")
    'mw/v1/site/+/gw/+/telemetry'
    >>> subscription("site_status", site="dma-01")
    'mw/v1/site/dma-01/gw/+/status'
    """
    template = TEMPLATES[kind]
    names = _level_names(template)
    unknown = set(params) - set(names)
    if unknown:
        msg = f"topic {kind!r} has no levels {sorted(unknown)}; it has {names}"
        raise ValueError(msg)
    return template.format(**{name: params.get(name, "+") for name in names})


def site_telemetry(site: str, gateway: str) -> str:
    """Where a gateway publishes its telemetry batches."""
    return build("site_telemetry", site=site, gateway=gateway)


def site_status(site: str, gateway: str) -> str:
    """A gateway's retained birth/death/heartbeat topic."""
    return build("site_status", site=site, gateway=gateway)


def mesh_telemetry(partition: int) -> str:
    """The cloud-mesh telemetry topic of one partition."""
    return build("mesh_telemetry", partition=partition)


def alerts(district: str, kind: str) -> str:
    """Where the dataflows publish alerts of ``kind`` for ``district``."""
    return build("alerts", district=district, kind=kind)


def crew_work_orders(crew: str) -> str:
    """Where remediation notifies ``crew`` of its work orders (created, assigned, escalated...).

    >>> crew_work_orders("crew-north")
    'mw/v1/crews/crew-north/work_orders'
    """
    return build("crew_work_orders", crew=crew)


def dead_letter(reason: str) -> str:
    """Where rejected messages go, by reason code."""
    return build("dead_letter", reason=reason)


def partition_of(device_id: str, partitions: int) -> int:
    """The mesh partition of a device: a hash that is stable across processes and releases."""
    if partitions < 1:
        msg = f"partitions must be at least 1, got {partitions}"
        raise ValueError(msg)
    return zlib.crc32(device_id.encode()) % partitions


def _level_names(template: str) -> list[str]:
    return [level[1:-1] for level in template.split("/") if level.startswith("{")]
