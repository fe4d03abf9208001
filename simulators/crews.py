"""Field crews that work the remediation API like people would, with outcomes from ground truth.

For demos and load: each crew logs in with its token (``meshwatch remediation``'s API), takes
its assigned work orders, acknowledges each after a reaction delay, starts after a travel
delay, and finishes after the repair (or the inspection) takes its time. Delays are drawn from
log-normal distributions around realistic medians and divided by ``speed`` (a simulated fleet
runs faster than real time).

What the crew finds comes from the simulator's ground truth: its incidents
(``ground_truth.csv``), the clock skews of its communication faults (``comm_faults.csv``,
one row per skewed reading, grouped into one episode per device and offset by
:meth:`TruthBook.record_skew`), and its silences: a device whose readings do not arrive, for
a network gap or a gateway outage (from the same log) or a dead battery (a
``battery_depletion`` incident from its ``silent_from_ms``), built as the evaluation builds
them (:func:`simulators.truth.comm_episodes`, :func:`simulators.truth.battery_silence`). A
:class:`TruthBook` holds that truth and may grow while the simulation runs, so a crew judges
an alert against the truth active at that time: ongoing episodes (a network leak lasts about
a month) count as soon as they begin. The work order's incident is matched
(:func:`outcome_for`) to an episode of a compatible kind at the same place whose time
overlaps the incident's, give or take :data:`SLACK_MS`:

- a *district* incident (no device, or the district's inlet meter ``<district>-inlet``) of
  kind ``burst`` or ``leak`` matches a district-wide episode (no device) in the same district:
  ``burst`` a ``burst``, ``leak`` a ``network_leak``;
- a *device* incident matches that device's episodes: ``leak`` a ``customer_leak``,
  ``sensor_fault`` a meter fault (``stuck``, ``stopped``, ``spikes``, ``drift``,
  ``battery_depletion``, ``clock_skew``), ``silent`` a ``silent`` episode, ``burst`` a
  ``burst``.

A match is resolved with its outcome (a leak is a ``confirmed_leak``, a burst a
``confirmed_burst``, a meter fault or a silence a ``meter_fault``); anything else (no
episode, another kind, another place or time, kinds such as ``anomaly``) is a
``false_alarm``. A crew sent to a meter that really stopped reporting finds a device or
communications problem to fix (a dead battery, a lost radio link, a gateway's backhaul), not
a false alarm: ``meter_fault`` says so, counts as a repair in remediation's KPIs, and in
:mod:`models.feedback` leaves a ``silent`` alert standing without muting or teaching anything
(a ``false_alarm`` would mute silent alerts on that meter for ``mute_h``, hiding its next
real silence).

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
>>> outcome_for("silent", "mtr-7", "dma-01", 5000, 5000,
...             [*truth, TruthEpisode("mtr-7", "dma-01", "silent", 4000, 9000)])
'meter_fault'
>>> outcome_for("silent", "mtr-7", "dma-01", 5000, 5000, truth)
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from simulators.comms import CommFault, CommFaultLog
from simulators.config import FleetConfig
from simulators.fleet import Fleet
from simulators.truth import Episode, battery_silence, comm_episodes

log = logging.getLogger(__name__)

OUTCOMES = {"customer_leak": "confirmed_leak", "network_leak": "confirmed_leak",
            "burst": "confirmed_burst"}
"""Ground-truth kinds that are not here are meter faults (stuck, stopped, spikes...) or
silences, which a crew finds as a ``meter_fault``."""
METER_FAULTS = frozenset({"stuck", "stopped", "spikes", "drift", "battery_depletion",
                          "clock_skew"})
"""Ground-truth kinds a ``sensor_fault`` alert is about."""
DEVICE_MATCHES: dict[str, frozenset[str]] = {
    "leak": frozenset({"customer_leak"}),
    "sensor_fault": METER_FAULTS,
    "silent": frozenset({"silent"}),
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
    (the later record replaces the earlier); a ``battery_depletion`` brings the silence of
    its dead meter (:func:`~simulators.truth.battery_silence`, to the incident's end). Clock
    skews come one skewed reading at a time and are grouped by device and offset: an episode
    covers its readings' true times and the times they reported, whichever is wider (as
    :mod:`models.evaluate` scores them). Silences (network gaps, gateway outages) come one
    step of the communication-fault log at a time (:func:`~simulators.truth.comm_episodes`)
    and are grouped by device and gap (or outage), each widened to cover its earlier steps:
    the ``silent`` episodes that :mod:`models.evaluate` builds from the whole log.

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
                begin, end = ts_ms + min(offset_ms, 0), ts_ms + max(offset_ms, 0)
                self._widen(("clock_skew", device_id, offset_ms),
                            TruthEpisode(device_id, district, "clock_skew", begin, end))

    def record_episode(self, episode: Episode, device_ids: Sequence[str] | np.ndarray,
                       district_ids: Sequence[str]) -> None:
        """Add or update a simulator episode, and the silence of a dead battery.

        ``episode.device`` indexes ``device_ids`` (-1: none), ``episode.district``
        ``district_ids``.
        """
        for found in (episode, *battery_silence([episode], episode.end_ms)):
            self.record(found.episode_id, _truth_episode(found, device_ids, district_ids))

    def record_simulated(self, episode: Episode, fleet: Fleet) -> None:
        """Add or update a simulator incident (:mod:`simulators.truth`), begun or ended."""
        self.record_episode(episode, fleet.device_ids, fleet.district_ids)

    def record_comm_faults(self, log: CommFaultLog, fleet: Fleet, cadence_s: np.ndarray,
                           ) -> None:
        """Add the clock skews and silences in one step of the communication-fault log.

        ``cadence_s``: each device's reading interval (:meth:`simulators.fleet.Fleet.cadence_s`);
        a silence begins at the last reading before its first missed one.
        """
        rows = np.flatnonzero(log.fault == CommFault.CLOCK_SKEW)
        by_device: dict[int, list[tuple[int, int]]] = {}
        for row in rows.tolist():
            by_device.setdefault(int(log.device[row]), []).append(
                (int(log.ts_ms[row]), int(log.detail_ms[row])))
        for device, readings in by_device.items():
            self.record_skew(str(fleet.device_ids[device]),
                             fleet.district_ids[int(fleet.district_of[device])], readings)
        self._record_silences(log, fleet.device_ids, fleet.district_of, fleet.district_ids,
                              cadence_s)

    def episodes(self) -> list[TruthEpisode]:
        """Every episode known now, in the order they were first recorded."""
        with self._lock:
            return list(self._episodes.values())

    def _record_silences(self, log: CommFaultLog, device_ids: Sequence[str] | np.ndarray,
                         district_of: np.ndarray, district_ids: Sequence[str],
                         cadence_s: np.ndarray) -> None:
        found = [e for e in comm_episodes([log], 0, district_of, cadence_s)
                 if e.kind == "silent"]  # no customers: no clock skews (see record_skew)
        with self._lock:
            for episode in found:  # magnitude: the gap's end or the backlog's delivery
                truth = _truth_episode(episode, device_ids, district_ids)
                self._widen(("silent", truth.device_id, int(episode.magnitude)), truth)

    def _widen(self, key: object, episode: TruthEpisode) -> None:
        """Record ``episode`` under ``key``, covering what is there too; hold the lock."""
        known = self._episodes.get(key)
        if known is not None:
            episode = episode._replace(start_ms=min(episode.start_ms, known.start_ms),
                                       end_ms=max(episode.end_ms, known.end_ms))
        self._episodes[key] = episode


def _truth_episode(episode: Episode, device_ids: Sequence[str] | np.ndarray,
                   district_ids: Sequence[str]) -> TruthEpisode:
    device = None if episode.device < 0 else str(device_ids[episode.device])
    return TruthEpisode(device, district_ids[episode.district], episode.kind,
                        episode.start_ms, episode.end_ms)


def load_truth(path: Path, comm_faults: Path | None = None, *,
               cadence_s: int = FleetConfig.customer_cadence_s) -> list[TruthEpisode]:
    """Read the simulator's ``ground_truth.csv``, and its ``comm_faults.csv`` if given.

    The incidents come with the silences of dead batteries; ``comm_faults.csv`` adds clock
    skews and silences (network gaps, gateway outages). That file names no district: its
    episodes have district ``""``, which no device-level match looks at; nor each device's
    reading interval: a silence begins ``cadence_s`` (the customer meters' default) before
    its first missed reading.
    """
    districts: dict[str, int] = {}
    devices: dict[str, int] = {}
    book = TruthBook()
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        id_column = (reader.fieldnames or ["incident_id"])[0]
        episodes = [Episode(
            row[id_column], row["kind"],
            devices.setdefault(row["device_id"], len(devices)) if row["device_id"] else -1,
            districts.setdefault(row["district"], len(districts)), int(row["start_ms"]),
            int(row["end_ms"]), float(row.get("magnitude") or 0.0), row.get("unit") or "",
            row.get("detail") or "") for row in reader]
    for episode in episodes:
        book.record_episode(episode, list(devices), list(districts))
    if comm_faults is not None:
        with comm_faults.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            if row["fault"] == "clock_skew":
                book.record_skew(row["device_id"], "",
                                 [(int(row["ts_ms"]), int(row["detail_ms"]))])
        silent = [row for row in rows if row["fault"] in {"gap", "gateway_outage"}]
        for row in silent:
            devices.setdefault(row["device_id"], len(devices))
        log = CommFaultLog(
            np.array([devices[row["device_id"]] for row in silent], np.int64),
            np.array([int(row["seq"]) for row in silent], np.int64),
            np.array([int(row["ts_ms"]) for row in silent], np.int64),
            np.array([CommFault[row["fault"].upper()] for row in silent], np.int8),
            np.array([int(row["detail_ms"]) for row in silent], np.int64))
        book._record_silences(log, list(devices), np.zeros(len(devices), np.int32), [""],
                              np.full(len(devices), cadence_s))
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
                        help="comm_faults.csv, for the clock skews and silences it records")
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
