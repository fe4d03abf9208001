"""District leak: minimum night flow at the inlet and the night water balance, per district.

Input: one observation per customer interval (15 minutes) and district: ``flow_lpm``, the
inlet's mean flow over the interval, and optionally ``customer_flow_lpm``, the sum of the
district's customer meters over the same interval (already scaled up for meters that did not
report; see :class:`models.water.pipeline.DistrictAggregator`). The balance ``flow_lpm -
customer_flow_lpm`` is what the network loses: background leakage plus any unreported leak;
customer use and customer-side leaks cancel out of it.

Each night (``night_start_h``–``night_end_h`` UTC, when use is lowest) the detector averages
both. When the night ends, each mean is compared with its learned baseline: the minimum
night flow (MNF) against a baseline per day type (weekday, weekend), the balance against a
single baseline. The balance decides where it is known (a night flow that rose with the
customers' own use is not a network loss), the MNF where it is not. ``z = rise / scale``
with ``scale`` at least ``relative_floor`` of the baseline, and a night's rise in alarm
units is ``u = z / z_alarm`` (the balance uses ``balance_z_alarm``).

- **One night**: ``u >= 1`` alarms at once.
- **Persistence** (a CUSUM): ``S = clip(S + min(u, 1) - persist_slack, 0, persist_alarm)``
  adds up rises night after night, so a leak just under the one-night alarm alarms on its
  second or third night instead of being learned as the new normal. A night that is itself
  raised (``u >= persist_slack``) scores ``S / persist_alarm`` if that is higher; a night
  back at the baseline scores its own ``u`` (the leak was repaired).
- **Odd nights**: a night far below its baseline (``u < -odd_below``: an imputation gone
  wrong, a partial outage) says nothing about a leak; the verdict holds.

The score is ``0.9 * max(u, persistence)`` and holds until the next night ends. Baselines are
exponentially weighted (``alpha`` per night, so they follow the seasons) and learned only
from nights that were not flagged and rose less than ``learn_below`` (so a leak is never
learned while the evidence for it adds up). They are robust: a night counts as at most
``learn_clip`` spreads away (Huber; before ``min_nights`` are known, ``warm_clip`` of the
baseline), so an odd night moves the baseline and its spread a little, never by its own
size; a level far below the baseline (``relearn_limits`` times that clip) for
``relearn_nights`` nights in a row becomes the baseline (a leak from before the detector
started was repaired, or its first nights were odd). The estimated loss is the rise of the
balance (or of the MNF without customer data), in L/h.

Per district: 136 bytes of numpy state; about 1.8 KB pickled as one
:class:`DistrictLeakDetector`.

>>> detector = DistrictLeakDetector()
>>> start = 1_767_571_200_000
>>> for i in range(1, 96 * 12):  # 12 days; a 600 L/h leak from day 9
...     ts = start + i * 900_000
...     extra = 10.0 if i > 96 * 9 else 0.0
...     x = {"ts_ms": ts, "flow_lpm": 250.0 + 3 * (i % 5) + extra,
...          "customer_flow_lpm": 170.0 + 3 * (i % 5)}
...     detector.learn_one(x)
>>> evidence = detector.explain({"ts_ms": start + 96 * 12 * 900_000, "flow_lpm": 260.0,
...                              "customer_flow_lpm": 170.0})
>>> evidence["score"], round(evidence["est_loss_lph"])
(1.0, 600)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from models.water.base import MS_PER_DAY, MS_PER_HOUR, ColumnarDetector, FleetDetector


@dataclass(frozen=True)
class DistrictLeakSettings:
    """Hyper-parameters of :class:`DistrictLeakFleet` (see the module docs)."""

    night_start_h: float = 1.0
    night_end_h: float = 5.0
    min_night_share: float = 0.75
    min_nights: int = 4
    alpha: float = 0.15
    z_alarm: float = 6.0
    balance_z_alarm: float = 5.0
    relative_floor: float = 0.02
    persist_slack: float = 0.3
    persist_alarm: float = 1.0
    learn_below: float = 0.5
    learn_clip: float = 2.0
    warm_clip: float = 0.1
    odd_below: float = 1.0
    relearn_limits: float = 2.5
    relearn_nights: int = 3
    cadence_s: int = 900
    threshold: float = 0.9


class DistrictLeakFleet(FleetDetector):
    """District-leak state of many districts; inputs ``flow_lpm``, ``customer_flow_lpm``."""

    FIELDS: ClassVar = {
        "night_id": (np.int64, -1),
        "night_flow": (np.float64, 0.0),
        "night_n": (np.int32, 0),
        "night_balance": (np.float64, 0.0),
        "night_bn": (np.int32, 0),
        "verdict": (np.float64, 0.0),
        "loss_lpm": (np.float64, 0.0),
        "mnf_base_wd": (np.float64, 0.0),
        "mnf_dev_wd": (np.float64, 0.0),
        "mnf_n_wd": (np.int32, 0),
        "mnf_base_we": (np.float64, 0.0),
        "mnf_dev_we": (np.float64, 0.0),
        "mnf_n_we": (np.int32, 0),
        "bal_base": (np.float64, 0.0),
        "bal_dev": (np.float64, 0.0),
        "bal_n": (np.int32, 0),
        "excess": (np.float64, 0.0),
        "mnf_low_wd": (np.int32, 0),
        "mnf_low_we": (np.int32, 0),
        "bal_low": (np.int32, 0),
    }
    INPUTS = ("flow_lpm", "customer_flow_lpm")
    OPTIONAL = ("customer_flow_lpm",)
    EVIDENCE = ("est_loss_lph", "mnf_lph", "mnf_baseline_lph", "balance_lph",
                "balance_baseline_lph", "z_mnf", "z_balance")
    MAX_STEP_H = 1.0

    def __init__(self, settings: DistrictLeakSettings | None = None, capacity: int = 0) -> None:
        self.settings = settings or DistrictLeakSettings()
        self.threshold = self.settings.threshold
        super().__init__(capacity)

    def _close(self, slot: np.ndarray) -> dict[str, np.ndarray]:
        """The verdict of each slot's stored night (valid where ``usable``)."""
        cfg = self.settings
        expected = (cfg.night_end_h - cfg.night_start_h) * 3600 / cfg.cadence_s
        usable = self.night_n[slot] >= cfg.min_night_share * expected
        mnf = self.night_flow[slot] / np.maximum(self.night_n[slot], 1)
        weekend = ((self.night_id[slot] + 3) % 7) >= 5  # 1970-01-01 was a Thursday
        base = np.where(weekend, self.mnf_base_we[slot], self.mnf_base_wd[slot])
        dev = np.where(weekend, self.mnf_dev_we[slot], self.mnf_dev_wd[slot])
        known = np.where(weekend, self.mnf_n_we[slot], self.mnf_n_wd[slot]) >= cfg.min_nights
        z_mnf = np.where(known, (mnf - base) / np.maximum(1.25 * dev, cfg.relative_floor * base
                                                          + 1e-9), 0.0)
        has_balance = self.night_bn[slot] >= cfg.min_night_share * expected
        balance = self.night_balance[slot] / np.maximum(self.night_bn[slot], 1)
        bal_known = has_balance & (self.bal_n[slot] >= cfg.min_nights)
        bal_base = self.bal_base[slot]
        z_bal = np.where(bal_known, (balance - bal_base) / np.maximum(
            1.25 * self.bal_dev[slot], cfg.relative_floor * np.abs(bal_base) + 1e-9), 0.0)
        # where the balance is known it decides: a night flow that rose with the customers'
        # own use (or their leaks) is not a loss of the network
        rise = np.where(bal_known, z_bal / cfg.balance_z_alarm, z_mnf / cfg.z_alarm)
        # a rise that persists adds up night after night (CUSUM), so a leak just under the
        # one-night alarm is found in a few nights instead of being learned as normal
        # a night far below its baseline says nothing about a leak (imputation gone wrong,
        # a partial outage): the verdict holds (the baseline still learns it, clipped)
        judged = usable & (rise >= -cfg.odd_below)
        excess = np.where(judged, np.clip(self.excess[slot] + np.minimum(rise, 1.0)
                                          - cfg.persist_slack, 0.0, cfg.persist_alarm),
                          self.excess[slot])
        persistent = np.where(rise >= cfg.persist_slack, excess / cfg.persist_alarm, 0.0)
        score = np.clip(cfg.threshold * np.maximum(rise, persistent), 0.0, 1.0)
        score = np.where(judged, score, self.verdict[slot])
        loss = np.where(bal_known, balance - bal_base, mnf - base)
        loss = np.where(judged, np.maximum(loss, 0.0), self.loss_lpm[slot])
        return {"score": score, "loss": loss, "usable": usable, "rise": rise, "excess": excess,
                "mnf": mnf, "weekend": weekend,
                "balance": balance, "has_balance": has_balance, "z_mnf": z_mnf, "z_bal": z_bal,
                "mnf_base": base}

    def _score(self, slot: np.ndarray, cols: dict[str, np.ndarray],
               dt_h: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        cfg = self.settings
        ts = cols["ts_ms"]
        # an observation stamped at an interval's end belongs to the interval before it
        hour = ((ts - 1) % MS_PER_DAY) / MS_PER_HOUR
        in_night = (hour >= cfg.night_start_h) & (hour < cfg.night_end_h)
        day = (ts - 1) // MS_PER_DAY
        stored = self.night_id[slot]
        closing = (stored >= 0) & ~(in_night & (stored == day))
        closed = self._close(slot)
        score = np.where(closing, closed["score"], self.verdict[slot])
        loss = np.where(closing, closed["loss"], self.loss_lpm[slot])
        aux = {
            "est_loss_lph": loss * 60.0, "mnf_lph": closed["mnf"] * 60.0,
            "mnf_baseline_lph": closed["mnf_base"] * 60.0,
            "balance_lph": closed["balance"] * 60.0,
            "balance_baseline_lph": self.bal_base[slot] * 60.0,
            "z_mnf": closed["z_mnf"], "z_balance": closed["z_bal"],
            "_closing": closing, "_in_night": in_night, "_day": day,
            **{f"_c_{key}": value for key, value in closed.items()},
        }
        return score, aux

    def _learn(self, slot: np.ndarray, cols: dict[str, np.ndarray], score: np.ndarray,
               aux: dict[str, np.ndarray]) -> None:
        cfg = self.settings
        closing = aux["_closing"]
        done = slot[closing]
        if done.size:
            usable = aux["_c_usable"][closing]
            verdict = aux["_c_score"][closing]
            self.verdict[done] = verdict
            self.loss_lpm[done] = aux["_c_loss"][closing]
            self.excess[done] = aux["_c_excess"][closing]
            learn = usable & (verdict < cfg.threshold) & (aux["_c_rise"][closing]
                                                          < cfg.learn_below)
            weekend = aux["_c_weekend"][closing]
            mnf = aux["_c_mnf"][closing]
            for flag, suffix in ((False, "wd"), (True, "we")):
                pick = learn & (weekend == flag)
                self._ew(done[pick], mnf[pick], f"mnf_base_{suffix}", f"mnf_dev_{suffix}",
                         f"mnf_n_{suffix}", f"mnf_low_{suffix}")
            pick = learn & aux["_c_has_balance"][closing]
            self._ew(done[pick], aux["_c_balance"][closing][pick], "bal_base", "bal_dev",
                     "bal_n", "bal_low")
        in_night = aux["_in_night"]
        fresh = in_night & (self.night_id[slot] != aux["_day"])
        flow, customers = cols["flow_lpm"], cols["customer_flow_lpm"]
        has = ~np.isnan(customers)
        balance = np.where(has, flow - np.where(has, customers, 0.0), 0.0)
        keep = in_night & ~fresh
        self.night_flow[slot] = np.where(in_night, np.where(keep, self.night_flow[slot], 0.0)
                                         + flow, 0.0)
        self.night_n[slot] = np.where(in_night, np.where(keep, self.night_n[slot], 0) + 1, 0)
        self.night_balance[slot] = np.where(
            in_night, np.where(keep, self.night_balance[slot], 0.0) + balance, 0.0)
        self.night_bn[slot] = np.where(in_night, np.where(keep, self.night_bn[slot], 0) + has,
                                       0)
        self.night_id[slot] = np.where(in_night, aux["_day"], -1)

    def accept(self, slot: int) -> None:
        """Feedback "false alarm": take the level that was flagged as this district's normal.

        The baselines move up by the estimated loss, and the current verdict is dropped.
        """
        if slot >= self.capacity:
            self.grow(slot + 1)
        rise = self.loss_lpm[slot]
        for name in ("mnf_base_wd", "mnf_base_we", "bal_base"):
            getattr(self, name)[slot] += rise
        self.verdict[slot] = 0.0
        self.loss_lpm[slot] = 0.0
        self.excess[slot] = 0.0

    def _ew(self, target: np.ndarray, value: np.ndarray, base_name: str, dev_name: str,
            n_name: str, low_name: str) -> None:
        base, dev, n = getattr(self, base_name), getattr(self, dev_name), getattr(self, n_name)
        low = getattr(self, low_name)
        a = self.settings.alpha
        first = n[target] == 0
        old = base[target]
        raw = value
        # a night counts as at most ``learn_clip`` spreads away (Huber; before the spread is
        # known, ``warm_clip`` of the baseline): an odd night moves the baseline and the
        # spread a little, never by its own size
        cfg = self.settings
        limit = np.where(n[target] >= cfg.min_nights,
                         cfg.learn_clip * np.maximum(1.25 * dev[target],
                                                     cfg.relative_floor * np.abs(old)),
                         np.where(first, np.inf, cfg.warm_clip * np.abs(old))) + 1e-9
        value = old + np.clip(value - old, -limit, limit)
        dev[target] = np.where(first, 0.0, (1 - a) * dev[target] + a * np.abs(value - old))
        base[target] = np.where(first, value, (1 - a) * old + a * value)
        n[target] += 1
        # a level far below the baseline for ``relearn_nights`` nights in a row is the new
        # baseline (a leak from before was repaired, or the first nights were odd)
        far = raw - old < -cfg.relearn_limits * limit
        low[target] = np.where(far, low[target] + 1, 0)
        anchor = target[low[target] >= cfg.relearn_nights]
        base[anchor] = raw[low[target] >= cfg.relearn_nights]
        low[anchor] = 0


class DistrictLeakDetector(ColumnarDetector):
    """One district's leak detector (the contract over :class:`DistrictLeakFleet`).

    ``x`` holds ``ts_ms`` (an interval's end), ``flow_lpm`` (the inlet's mean flow over the
    interval) and optionally ``customer_flow_lpm``.
    """

    FLEET = DistrictLeakFleet

    def __init__(self, settings: DistrictLeakSettings | None = None) -> None:
        super().__init__(settings or DistrictLeakSettings())
        self.threshold = self.settings.threshold
