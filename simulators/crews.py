"""Field crews that work the remediation API like people would, with outcomes from ground truth.

For demos and load: each crew logs in with its token (``meshwatch remediation``'s API), takes
its assigned work orders, acknowledges each after a reaction delay, starts after a travel
delay, and finishes after the repair (or the inspection) takes its time. Delays are drawn from
log-normal distributions around realistic medians and divided by ``speed`` (a simulated fleet
runs faster than real time).

What the crew finds comes from the simulator's ground truth: its incidents
(``ground_truth.csv``) and the clock skews of its communication faults (``comm_faults.csv``,
one row per skewed reading, grouped into one episode per device and offset by
:meth:`TruthBook.record_skew`). A :class:`TruthBook` holds that truth and may grow while the
simulation runs, so a crew judges an alert against the truth active at that time: ongoing
episodes (a network leak lasts about a month) count as soon as they begin. The work order's
incident is matched (:func:`outcome_for`) to an episode of a compatible kind at the same place
whose time overlaps the incident's, give or take :data:`SLACK_MS`:

- a *district* incident (no device, or the district's inlet meter ``<district>-inlet``) of
  kind ``burst`` or ``leak`` matches a district-wide episode (no device) in the same district:
  ``burst`` a ``burst``, ``leak`` a ``network_leak``;
- a *device* incident matches that device's episodes: ``leak`` a ``customer_leak``,
  ``sensor_fault`` a meter fault (``stuck``, ``stopped``, ``spikes``, ``drift``,
  ``battery_depletion``, ``clock_skew``), ``burst`` a ``burst``.

A match is resolved with its outcome (a leak is a ``confirmed_leak``, a burst a
``confirmed_burst``, a meter fault a ``meter_fault``); anything else (no episode, another
kind, another place or time, kinds such as ``silent`` or ``anomaly``) is a ``false_alarm``.

Run: ``python -m simulators.crews --api http://127.0.0.1:8080 --truth out/ground_truth.csv
--comm-faults out/comm_faults.csv --crew crew-north=TOKEN [--crew ...] --speed 600``

>>> truth = [TruthEpisode("mtr-7", "dma-01", "customer_leak", 1000, 9000),
...          TruthEpisode(None, "dma-02", "burst", 1000, 2000),
...          TruthEpisode(None, "dma-02", "network_leak", 1000, 9000)]
>>> outcome_for("leak", "mtr-7", "dma-01", 5000, 5000, truth)
'confirmed_leak'
>>> outcome_for("burst", None, "dma-02", 1500, 1800, truth)
'confirmed_burst'
>>> outcome_for("leak", "dma-02-inlet", "dma-02", 5000, 5000, truth)
'confirmed_leak'
>>> outcome_for("leak", "mtr-8", "dma-01", 5000, 5000, truth)
'false_alarm'
>>> outcome_for("sensor_fault", "mtr-7", "dma-01", 5000, 5000, truth)
'false_alarm'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from simulators.comms import CommFault, CommFaultLog
from simulators.fleet import Fleet
from simulators.truth import Episode

log = logging.getLogger(__name__)

OUTCOMES = {"customer_leak": "confirmed_leak", "network_leak": "confirmed_leak",
            "burst": "confirmed_burst"}
"""Ground-truth kinds that are not here are meter faults (stuck, stopped, spikes...)."""
METER_FAULTS = frozenset({"stuck", "stopped", "spikes", "drift", "battery_depletion",
                          "clock_skew"})
"""Ground-truth kinds a ``sensor_fault`` alert is about."""
DEVICE_MATCHES: dict[str, frozenset[str]] = {
    "leak": frozenset({"customer_leak"}),
    "sensor_fault": METER_FAULTS,
    "burst": frozenset({"burst"}),
}
"""Alert kind -> the ground-truth kinds it confirms on its own device."""
DISTRICT_MATCHES: dict[str, frozenset[str]] = {
    "leak": frozenset({"network_leak"}),
    "burst": frozenset({"burst"}),
}
"""Alert kind -> the district-wide ground-truth kinds it confirms in its district."""
SLACK_MS = 3_600_000
"""An episode counts if it overlaps the incident's event time give or take this much."""
MEDIAN_S = {"acknowledged": 5 * 60.0, "in_progress": 30 * 60.0, "repair": 3 * 3600.0,
            "inspect": 20 * 60.0}
"""Median real-world seconds: react, travel, repair a real fault, inspect a false alarm."""


class TruthEpisode(NamedTuple):
    """One ground-truth incident: where (device, or None for a district), what, when."""

    device_id: str | None
    district: str
    kind: str
    start_ms: int
    end_ms: int


class TruthBook:
    """Ground truth as far as it is known, growing while a simulation runs; thread-safe.

    Incidents are recorded under their episode id when they begin and again when they end
    (the later record replaces the earlier). Clock skews come one skewed reading at a time
    and are grouped by device and offset: an episode covers its readings' true times and
    the times they reported, whichever is wider (as :mod:`models.evaluate` scores them).

    >>> book = TruthBook([TruthEpisode(None, "dma-01", "network_leak", 0, 30 * 86_400_000)])
    >>> book.record_skew("mtr-7", "dma-01", [(3_600_000, 600_000), (7_200_000, 600_000)])
    >>> [(e.kind, e.start_ms, e.end_ms) for e in book.episodes()][1]
    ('clock_skew', 3600000, 7800000)
    >>> outcome_for("sensor_fault", "mtr-7", "dma-01", 7_000_000, 7_000_000, book.episodes())
    'meter_fault'
    """

    def __init__(self, episodes: Iterable[TruthEpisode] = ()) -> None:
        self._lock = threading.Lock()
        self._episodes: dict[object, TruthEpisode] = dict(enumerate(episodes))

    def record(self, key: str, episode: TruthEpisode) -> None:
        """Add ``episode`` under ``key``, or replace what is there (a begun episode ended)."""
        with self._lock:
            self._episodes[key] = episode

    def record_skew(self, device_id: str, district: str,
                    readings: Iterable[tuple[int, int]]) -> None:
        """Add skewed readings of ``device_id``: ``(true ts_ms, offset_ms)`` pairs."""
        with self._lock:
            for ts_ms, offset_ms in readings:
                key = ("clock_skew", device_id, offset_ms)
                begin, end = ts_ms + min(offset_ms, 0), ts_ms + max(offset_ms, 0)
                known = self._episodes.get(key)
                if known is not None:
                    begin, end = min(begin, known.start_ms), max(end, known.end_ms)
                self._episodes[key] = TruthEpisode(device_id, district, "clock_skew", begin,
                                                   end)

    def record_simulated(self, episode: Episode, fleet: Fleet) -> None:
        """Add or update a simulator incident (:mod:`simulators.truth`), begun or ended."""
        device = None if episode.device < 0 else str(fleet.device_ids[episode.device])
        self.record(episode.episode_id, TruthEpisode(
            device, fleet.district_ids[episode.district], episode.kind, episode.start_ms,
            episode.end_ms))

    def record_comm_faults(self, log: CommFaultLog, fleet: Fleet) -> None:
        """Add the clock skews in one step of the simulator's communication-fault log."""
        rows = np.flatnonzero(log.fault == CommFault.CLOCK_SKEW)
        by_device: dict[int, list[tuple[int, int]]] = {}
        for row in rows.tolist():
            by_device.setdefault(int(log.device[row]), []).append(
                (int(log.ts_ms[row]), int(log.detail_ms[row])))
        for device, readings in by_device.items():
            self.record_skew(str(fleet.device_ids[device]),
                             fleet.district_ids[int(fleet.district_of[device])], readings)

    def episodes(self) -> list[TruthEpisode]:
        """Every episode known now, in the order they were first recorded."""
        with self._lock:
            return list(self._episodes.values())


def load_truth(path: Path, comm_faults: Path | None = None) -> list[TruthEpisode]:
    """Read the simulator's ``ground_truth.csv``, and the clock skews of its ``comm_faults.csv``.

    ``comm_faults.csv`` names no district: its episodes have district ``""``, which no
    device-level match looks at.
    """
    with path.open(newline="", encoding="utf-8") as handle:
        book = TruthBook(TruthEpisode(row["device_id"] or None, row["district"], row["kind"],
                                      int(row["start_ms"]), int(row["end_ms"]))
                         for row in csv.DictReader(handle))
    if comm_faults is not None:
        with comm_faults.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["fault"] == "clock_skew":
                    book.record_skew(row["device_id"], "",
                                     [(int(row["ts_ms"]), int(row["detail_ms"]))])
    return book.episodes()


def inlet_id(district: str) -> str:
    """The device id of ``district``'s inlet meter (see :mod:`simulators.fleet`).

    >>> inlet_id("dma-01")
    'dma-01-inlet'
    """
    return f"{district}-inlet"


def is_district_wide(kind: str, device_id: str | None, district: str) -> bool:
    """Whether an incident is about its whole district rather than one device.

    No device, or a district kind (``leak``, ``burst``) seen at the district's inlet meter.

    >>> [is_district_wide(kind, device, "dma-01") for kind, device in [
    ...     ("leak", None), ("burst", "dma-01-inlet"), ("sensor_fault", "dma-01-inlet"),
    ...     ("leak", "mtr-1")]]
    [True, True, False, False]
    """
    return device_id is None or (device_id == inlet_id(district) and kind in DISTRICT_MATCHES)


def outcome_for(kind: str, device_id: str | None, district: str, first_ts_ms: int,
                last_ts_ms: int, truth: list[TruthEpisode], *, slack_ms: int = SLACK_MS,
                ) -> str:
    """What a crew finds for an incident of alert ``kind`` on ``device_id`` in ``district``.

    The first episode of a compatible kind at the same place (the district's district-wide
    episodes for a district-wide incident, :func:`is_district_wide`; else the device's)
    overlapping ``[first_ts_ms - slack_ms, last_ts_ms + slack_ms]`` gives the outcome; none
    is a ``false_alarm``.
    """
    district_wide = is_district_wide(kind, device_id, district)
    wanted = (DISTRICT_MATCHES if district_wide else DEVICE_MATCHES).get(kind, frozenset())
    for episode in truth:
        if episode.kind not in wanted:
            continue
        if episode.start_ms > last_ts_ms + slack_ms or episode.end_ms < first_ts_ms - slack_ms:
            continue
        same_place = (episode.device_id is None and episode.district == district
                      if district_wide else episode.device_id == device_id)
        if same_place:
            return OUTCOMES.get(episode.kind, "meter_fault")
    return "false_alarm"


def delay_s(step: str, speed: float, rng: random.Random) -> float:
    """A log-normal delay (sigma 0.5) around the step's median, divided by ``speed``.

    >>> 0 < delay_s("repair", 3600.0, random.Random(1)) < 30
    True
    """
    return MEDIAN_S[step] * math.exp(rng.gauss(0.0, 0.5)) / speed


@dataclass
class _Plan:
    due: float
    to: str
    outcome: str | None = None


class CrewSimulator:
    """Drive every crew's work orders through the API; see the module doc."""

    def __init__(self, api: str, crews: dict[str, str],
                 truth: list[TruthEpisode] | TruthBook, *, speed: float = 60.0,
                 seed: int = 1) -> None:
        self.api = api.rstrip("/")
        self.crews = crews
        self.truth = truth if isinstance(truth, TruthBook) else TruthBook(truth)
        """What the crews find, consulted when a crew starts on a work order."""
        self.speed = speed
        self.rng = random.Random(seed)
        self.plans: dict[str, _Plan] = {}
        self.done: dict[str, str] = {}  # work order -> outcome

    def step(self) -> int:
        """Look at every crew's active work orders once; act on what is due. Returns actions."""
        now = time.monotonic()
        actions = 0
        for crew, token in self.crews.items():
            orders = self._get(token, "/api/v1/work-orders?limit=500")["items"]
            for wo in orders:
                wid = wo["work_order_id"]
                plan = self.plans.get(wid)
                if plan is None or plan.to == "" or self._stale(plan, wo["state"]):
                    plan = self._plan(token, wo, now)
                    if plan is None:
                        continue
                    self.plans[wid] = plan
                if plan.due <= now:
                    body = {"state": plan.to, "note": f"simulated {crew}"}
                    if plan.outcome is not None and plan.to == "resolved":
                        body["outcome"] = plan.outcome
                    self._post(token, f"/api/v1/work-orders/{wid}/transitions", body)
                    actions += 1
                    if plan.to in {"resolved", "false_alarm"}:
                        self.done[wid] = plan.outcome or plan.to
                    del self.plans[wid]
        return actions

    def run(self, duration_s: float, poll_s: float = 0.2) -> None:
        """Step until ``duration_s`` passed."""
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            self.step()
            time.sleep(poll_s)

    def _stale(self, plan: _Plan, state: str) -> bool:
        follows = {"assigned": "acknowledged", "acknowledged": "in_progress"}
        return follows.get(state, "done") != plan.to and plan.to not in {"resolved",
                                                                          "false_alarm"}

    def _plan(self, token: str, wo: dict[str, Any], now: float) -> _Plan | None:
        state = wo["state"]
        if state == "assigned":
            return _Plan(now + delay_s("acknowledged", self.speed, self.rng), "acknowledged")
        if state == "acknowledged":
            return _Plan(now + delay_s("in_progress", self.speed, self.rng), "in_progress")
        if state == "in_progress":
            detail = self._get(token, f"/api/v1/work-orders/{wo['work_order_id']}")
            incident = detail["incident"]
            found = outcome_for(incident["kind"], wo["device_id"], wo["district"],
                                incident["first_ts_ms"], incident["last_ts_ms"],
                                self.truth.episodes())
            if found == "false_alarm":
                return _Plan(now + delay_s("inspect", self.speed, self.rng), "false_alarm",
                             "false_alarm")
            return _Plan(now + delay_s("repair", self.speed, self.rng), "resolved", found)
        return None

    def _get(self, token: str, path: str) -> Any:
        return self._call(token, "GET", path, None)

    def _post(self, token: str, path: str, body: dict[str, Any]) -> Any:
        try:
            return self._call(token, "POST", path, body)
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # someone else moved it meanwhile: re-plan next step
                log.info("conflict on %s: %s", path, exc.read()[:200])
                return None
            raise

    def _call(self, token: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
        request = urllib.request.Request(
            self.api + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    """``python -m simulators.crews``: run crews against a remediation API."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True, help="base URL of meshwatch remediation")
    parser.add_argument("--truth", type=Path, required=True, help="ground_truth.csv")
    parser.add_argument("--comm-faults", type=Path, default=None,
                        help="comm_faults.csv, for the clock skews it records")
    parser.add_argument("--crew", action="append", required=True, metavar="ID=TOKEN")
    parser.add_argument("--speed", type=float, default=60.0, help="time compression")
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    crews = dict(item.split("=", 1) for item in args.crew)
    sim = CrewSimulator(args.api, crews, load_truth(args.truth, args.comm_faults),
                        speed=args.speed, seed=args.seed)
    sim.run(args.duration_s)
    print(json.dumps({"closed": len(sim.done), "outcomes": sim.done}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
