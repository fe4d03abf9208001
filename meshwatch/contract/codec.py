"""JSON encoding and decoding of contract events.

Decoding validates the whole payload and raises only :class:`ContractError`,
whatever the bytes are.

>>> from meshwatch.contract.events import Reading, TelemetryBatch
>>> batch = TelemetryBatch(site="dma-01", gateway_id="gw-01", sent_ms=1767225605000,
...     readings=[Reading(device_id="m1", ts_ms=1767225600000, seq=0,
...                       metrics={"flow_lpm": 1.5})])
>>> decode(encode(batch), TelemetryBatch) == batch
True
>>> decode(b'{"type": "telemetry", "schema_version": "2.0"}', TelemetryBatch)
Traceback (most recent call last):
...
meshwatch.contract.errors.ContractError: unsupported_version: schema_version: ...
"""

from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from meshwatch.contract.errors import ContractError, Reason
from meshwatch.contract.events import Event

E = TypeVar("E", bound=BaseModel)

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
"""Larger payloads are rejected as ``too_large`` before parsing."""

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

# Most specific first: the first rule that matches an error names the reason.
_ROOT_NOT_OBJECT = frozenset({"model_type", "model_attributes_type", "dict_type"})


def _reason(errors: list[Any], expected_tag: str | None) -> Reason:
    types = {e["type"] for e in errors}
    if types & {"json_invalid", "json_type"}:
        return Reason.MALFORMED_JSON
    if any(not e["loc"] and e["type"] in _ROOT_NOT_OBJECT for e in errors):
        return Reason.NOT_AN_OBJECT
    if types & {"union_tag_invalid", "union_tag_not_found"}:
        return Reason.UNKNOWN_TYPE
    if expected_tag is not None and any(e["loc"] == ("type",) for e in errors):
        return Reason.WRONG_TYPE
    if "unsupported_version" in types:
        return Reason.UNSUPPORTED_VERSION
    if "missing" in types:
        return Reason.MISSING_FIELD
    return Reason.INVALID_FIELD


def encode(event: BaseModel) -> bytes:
    """Encode an event as compact UTF-8 JSON."""
    return event.__pydantic_serializer__.to_json(event)


def decode(payload: bytes | str, expected: type[E]) -> E:
    """Decode and validate ``payload`` as one event of type ``expected``.

    Raises :class:`ContractError` with a reason code on any failure.
    """
    _check_size(payload)
    try:
        return expected.model_validate_json(payload)
    except ValidationError as exc:
        raise _contract_error(exc, _root_tag(expected)) from None


def decode_event(payload: bytes | str) -> Event:
    """Decode any event, choosing its model by the ``type`` field."""
    _check_size(payload)
    try:
        return _EVENT_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        raise _contract_error(exc, None) from None


def _check_size(payload: bytes | str) -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        msg = f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        raise ContractError(Reason.TOO_LARGE, msg)


@cache
def _root_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    return None if field is None else str(field.default)


def _contract_error(exc: ValidationError, expected_tag: str | None) -> ContractError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    reason = _reason(errors, expected_tag)
    first = next((e for e in errors if _reason([e], expected_tag) == reason), errors[0])
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return ContractError(reason, f"{where}: {first['msg']}{more}")

