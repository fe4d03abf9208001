"""The one error that decoding raises, with a reason code fit for a dead-letter entry."""

from enum import StrEnum


class Reason(StrEnum):
    """Why a payload or topic was rejected; dead letters carry this code.

    The codes are stable: dashboards group dead letters by them.
    """

    TOO_LARGE = "too_large"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    WRONG_TYPE = "wrong_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    BAD_TOPIC = "bad_topic"


class ContractError(ValueError):
    """A payload or topic does not follow the Meshwatch event contract.

    ``reason`` is a :class:`Reason` code; ``detail`` says what was wrong and where.

    >>> err = ContractError(Reason.MISSING_FIELD, "readings.0.seq: Field required")
    >>> err.reason.value, str(err)
    ('missing_field', 'missing_field: readings.0.seq: Field required')
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
