"""Reconnect back-off: capped exponential delays with jitter, shared by edge agent and bridge.

Pure policy, no I/O: the caller sleeps for :meth:`Backoff.next_delay` seconds after each
failed attempt and calls :meth:`Backoff.reset` once a connection succeeds. Jitter keeps a
fleet of gateways that lost the same broker from reconnecting in lock-step.

Jitter modes (``initial_s`` = base, ``max_s`` = cap, attempt ``n`` counted from 0):

- ``"full"``: uniform in ``[0, min(cap, base * multiplier**n)]`` (AWS "full jitter"). The
  lowest load on a recovering broker; a delay may be close to 0.
- ``"decorrelated"``: uniform in ``[base, min(cap, 3 * previous)]`` (AWS "decorrelated
  jitter"), never below ``base``; the first delay is ``base``.
- ``"none"``: exactly ``min(cap, base * multiplier**n)``, for logs people read and for tests.

Randomness comes from ``random.Random(seed)``, so a seed gives the same delays every run.

>>> plain = Backoff(initial_s=0.5, max_s=4.0, jitter="none")
>>> [plain.next_delay() for _ in range(6)]
[0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
>>> plain.reset()
>>> plain.next_delay()
0.5
>>> full = Backoff(initial_s=1.0, max_s=30.0, seed=7)
>>> delays = [round(full.next_delay(), 3) for _ in range(4)]
>>> again = Backoff(initial_s=1.0, max_s=30.0, seed=7)
>>> delays == [round(again.next_delay(), 3) for _ in range(4)]
True
>>> all(0.0 <= d <= cap for d, cap in zip(delays, [1, 2, 4, 8]))
True
"""

from __future__ import annotations

import random
from typing import Literal

Jitter = Literal["full", "decorrelated", "none"]
JITTER_MODES: tuple[Jitter, ...] = ("full", "decorrelated", "none")


class Backoff:
    """Capped exponential back-off with jitter.

    Args:
        initial_s: the first (uncapped, unjittered) delay in seconds; must be > 0.
        max_s: no delay is ever longer than this; must be >= ``initial_s``.
        multiplier: growth per failed attempt (``"full"`` and ``"none"``); must be >= 1.
        jitter: ``"full"`` (default), ``"decorrelated"`` or ``"none"``; see the module doc.
        seed: seed of the private random generator; None seeds from the OS.

    Raises:
        ValueError: an argument is out of range; the message says which.

    """

    def __init__(
        self,
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        multiplier: float = 2.0,
        jitter: Jitter = "full",
        seed: int | None = None,
    ) -> None:
        if not initial_s > 0:
            msg = f"initial_s must be > 0 seconds, got {initial_s!r}"
            raise ValueError(msg)
        if not max_s >= initial_s:
            msg = f"max_s ({max_s!r}) must be >= initial_s ({initial_s!r})"
            raise ValueError(msg)
        if not multiplier >= 1:
            msg = f"multiplier must be >= 1 so delays never shrink, got {multiplier!r}"
            raise ValueError(msg)
        if jitter not in JITTER_MODES:
            msg = f"jitter must be one of {', '.join(JITTER_MODES)}; got {jitter!r}"
            raise ValueError(msg)
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self.jitter = jitter
        self.seed = seed
        self._rng = random.Random(seed)
        self._attempts = 0
        self._ceiling = initial_s  # min(cap, base * multiplier**attempts), kept without overflow
        self._previous = initial_s  # last delay, for decorrelated jitter

    @property
    def attempts(self) -> int:
        """How many delays were handed out since the last :meth:`reset`."""
        return self._attempts

    def next_delay(self) -> float:
        """The delay in seconds before the next attempt; each call counts one failed attempt."""
        if self.jitter == "decorrelated":
            high = self.initial_s if self._attempts == 0 else min(self.max_s, 3 * self._previous)
            delay = self._rng.uniform(self.initial_s, high)
        elif self.jitter == "full":
            delay = self._rng.uniform(0.0, self._ceiling)
        else:
            delay = self._ceiling
        self._attempts += 1
        self._previous = delay
        self._ceiling = min(self.max_s, self._ceiling * self.multiplier)
        return delay

    def reset(self) -> None:
        """Start over from ``initial_s``: call after a successful connection."""
        self._attempts = 0
        self._ceiling = self.initial_s
        self._previous = self.initial_s

    def __repr__(self) -> str:
        return (
            f"Backoff(initial_s={self.initial_s!r}, max_s={self.max_s!r}, "
            f"multiplier={self.multiplier!r}, jitter={self.jitter!r}, seed={self.seed!r})"
        )
