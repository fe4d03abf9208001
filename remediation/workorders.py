"""Work order life cycle, priority and SLA deadlines. Pure: the store applies the results.

States: ``open → assigned → acknowledged → in_progress → resolved | false_alarm | cancelled``.

============  ===============================================  ================
from          to                                               who
============  ===============================================  ================
open          assigned, cancelled                              operator, system
assigned      acknowledged, false_alarm                        crew, operator
assigned      open (unassign), assigned (reassign), cancelled  operator, system
acknowledged  in_progress, false_alarm                         crew, operator
acknowledged  cancelled, assigned (reassign)                   operator
in_progress   resolved (needs an outcome), false_alarm         crew, operator
in_progress   cancelled                                        operator
false_alarm   open (reopened by new evidence)                  system
cancelled     open (reopened by new evidence)                  system
============  ===============================================  ================

``resolved`` is final: new alerts after a repair open a new incident.

>>> check_transition("assigned", "acknowledged", role="crew", outcome=None)
>>> check_transition("open", "resolved", role="crew", outcome="confirmed_leak")
Traceback (most recent call last):
...
remediation.workorders.TransitionError: cannot go from open to resolved; from open: ...
>>> priority("major", est_loss_lph=1500.0, critical_customer=False)
1
"""

from __future__ import annotations

from typing import Literal

Role = Literal["operator", "crew", "system"]

STATES = ("open", "assigned", "acknowledged", "in_progress", "resolved", "false_alarm",
          "cancelled")
FINAL = frozenset({"resolved", "false_alarm", "cancelled"})
ACTIVE = frozenset({"open", "assigned", "acknowledged", "in_progress"})

# (from, to) -> roles allowed
_ALLOWED: dict[tuple[str, str], frozenset[str]] = {}


def _allow(frm: str, to: str, *roles: str) -> None:
    _ALLOWED[(frm, to)] = frozenset(roles)


_allow("open", "assigned", "operator", "system")
_allow("open", "cancelled", "operator", "system")
_allow("assigned", "acknowledged", "crew", "operator")
_allow("assigned", "false_alarm", "crew", "operator")
_allow("assigned", "open", "operator", "system")
_allow("assigned", "assigned", "operator", "system")
_allow("assigned", "cancelled", "operator", "system")
_allow("acknowledged", "in_progress", "crew", "operator")
_allow("acknowledged", "false_alarm", "crew", "operator")
_allow("acknowledged", "cancelled", "operator")
_allow("acknowledged", "assigned", "operator")
_allow("in_progress", "resolved", "crew", "operator")
_allow("in_progress", "false_alarm", "crew", "operator")
_allow("in_progress", "cancelled", "operator")
_allow("false_alarm", "open", "system")
_allow("cancelled", "open", "system")

RESOLVED_OUTCOMES = frozenset({"confirmed_leak", "confirmed_burst", "meter_fault", "no_access",
                               "other"})
REPAIR_OUTCOMES = frozenset({"confirmed_leak", "confirmed_burst", "meter_fault"})
"""Outcomes that count as a confirmed repair in the remediation rate."""

SEVERITY_PRIORITY = {"critical": 1, "major": 2, "minor": 3, "info": 4}
HIGH_LOSS_LPH = 1000.0
"""An estimated loss at least this high raises the priority by one."""


class TransitionError(ValueError):
    """A transition the life cycle does not allow; the message says what is allowed."""


def allowed_from(state: str, role: Role | None = None) -> list[str]:
    """States reachable from ``state`` (by ``role``, if given), in life-cycle order.

    >>> allowed_from("acknowledged", "crew")
    ['in_progress', 'false_alarm']
    """
    return [to for to in STATES
            if (state, to) in _ALLOWED and (role is None or role in _ALLOWED[(state, to)])]


def check_transition(frm: str, to: str, *, role: Role, outcome: str | None) -> None:
    """Raise :class:`TransitionError` unless ``role`` may move a work order ``frm`` → ``to``.

    ``resolved`` needs an outcome other than ``false_alarm`` (mark a false alarm with the
    ``false_alarm`` state instead); other states take no outcome.

    >>> check_transition("in_progress", "resolved", role="crew", outcome=None)
    Traceback (most recent call last):
    ...
    remediation.workorders.TransitionError: resolving needs an outcome: confirmed_burst, ...
    >>> check_transition("open", "cancelled", role="crew", outcome=None)
    Traceback (most recent call last):
    ...
    remediation.workorders.TransitionError: a crew cannot go from open to cancelled; ...
    """
    if to not in STATES:
        msg = f"unknown state {to!r}; states are {', '.join(STATES)}"
        raise TransitionError(msg)
    roles = _ALLOWED.get((frm, to))
    if roles is None:
        msg = f"cannot go from {frm} to {to}; from {frm}: {', '.join(allowed_from(frm)) or 'none'}"
        raise TransitionError(msg)
    if role not in roles:
        mine = ", ".join(allowed_from(frm, role)) or "none"
        msg = f"a {role} cannot go from {frm} to {to}; a {role} can go to: {mine}"
        raise TransitionError(msg)
    if to == "resolved" and outcome not in RESOLVED_OUTCOMES:
        msg = f"resolving needs an outcome: {', '.join(sorted(RESOLVED_OUTCOMES))}"
        raise TransitionError(msg)
    if to != "resolved" and outcome is not None and not (to == "false_alarm"
                                                        and outcome == "false_alarm"):
        msg = f"an outcome is given only when resolving, not when going to {to}"
        raise TransitionError(msg)


def priority(severity: str, *, est_loss_lph: float | None, critical_customer: bool) -> int:
    """1 (most urgent) to 4: from severity, one step more urgent for each of these.

    A high estimated loss, and a critical customer (hospital, dialysis...).

    >>> priority("minor", est_loss_lph=None, critical_customer=False)
    3
    >>> priority("minor", est_loss_lph=2000.0, critical_customer=True)
    1
    >>> priority("info", est_loss_lph=10.0, critical_customer=False)
    4
    """
    value = SEVERITY_PRIORITY[severity]
    if est_loss_lph is not None and est_loss_lph >= HIGH_LOSS_LPH:
        value -= 1
    if critical_customer:
        value -= 1
    return max(1, min(4, value))


def deadlines(created_ms: int, prio: int, ack_s: list[float], resolve_s: list[float],
              ) -> tuple[int, int]:
    """The acknowledge and resolve deadlines (epoch ms) of a work order of priority ``prio``.

    >>> deadlines(0, 1, [900, 3600, 14400, 86400], [14400, 86400, 259200, 604800])
    (900000, 14400000)
    """
    return (created_ms + int(ack_s[prio - 1] * 1000), created_ms + int(resolve_s[prio - 1] * 1000))


def sla_breach(state: str, now_ms: int, ack_due_ms: int, resolve_due_ms: int,
               level: int) -> int | None:
    """The escalation level a work order reaches now, if it is higher than ``level``.

    Level 1: not acknowledged by its deadline; level 2: not resolved by its deadline.

    >>> sla_breach("assigned", 1000, 500, 5000, 0)
    1
    >>> sla_breach("assigned", 1000, 500, 5000, 1) is None
    True
    >>> sla_breach("in_progress", 6000, 500, 5000, 0)
    2
    >>> sla_breach("resolved", 6000, 500, 5000, 0) is None
    True
    """
    if state in FINAL:
        return None
    reached = 0
    if now_ms >= resolve_due_ms:
        reached = 2
    elif now_ms >= ack_due_ms and state in {"open", "assigned"}:
        reached = 1
    return reached if reached > level else None
