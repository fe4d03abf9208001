"""District hydraulics: inlet flow and pressure, and the pump station that feeds it.

Per district and minute:

- Inlet flow = customer consumption (true volumes, including customer-side leaks, spread
  over the interval's minutes with 3 % minute-to-minute noise that keeps the interval
  total) + background leakage + network leaks + bursts. Real losses are 10–25 % of system
  input in most utilities (England and Wales average ~20 %, ~120 L/property/day);
  background leakage is log-normal around 3 L/h per connection (~70 L/day, sd 0.5 in
  log space) and varies with pressure as P^1.5, network leaks as P^1 (FAVAD).
- Pressure: the pump delivers ``P0`` (3.5–5.5 bar) at zero flow and loses ``k·Q²`` along
  its curve and the trunk main, ~0.8 bar in total at the design peak flow (2.5× the
  district's mean demand plus leakage); a burst subtracts a further 0.5–2 bar.
- The pump station measures the same flow (its own meter, ±1 % bias, 0.5 % noise), the
  suction pressure of its reservoir (0.5–1.5 bar), runs ``ceil(Q / capacity)`` duty pumps
  (one pump is standby at the design peak), draws ``Q·ΔP / 0.7`` of electric power, and
  counts cumulative ``energy_kwh`` and pump ``running_h`` from realistic starting values.
- District meters read with 0.5 % noise (electromagnetic flow meter) and 0.01 bar noise.

>>> import numpy as np
>>> hydraulics = Hydraulics(np.array([1500]), np.array([600.0]), np.random.default_rng(0),
...                        pumps_per_station=3)
>>> zeros = np.zeros((1, 15))
>>> inlet, pump = hydraulics.step(np.array([90_000.0]), zeros, zeros, zeros, minutes_per_sample=1)
>>> sorted(inlet), bool((inlet["flow_lpm"] > 100).all())
(['flow_lpm', 'pressure_bar'], True)
"""

from __future__ import annotations

import numpy as np

PEAK_FACTOR = 2.5
PUMP_LOSS_AT_PEAK_BAR = 0.3
MAIN_LOSS_AT_PEAK_BAR = 0.5
BACKGROUND_LPH_PER_CONNECTION = 3.0
BACKGROUND_SIGMA = 0.5
BACKGROUND_EXPONENT = 1.5
NETWORK_LEAK_EXPONENT = 1.0
PUMP_EFFICIENCY = 0.7
FLOW_NOISE = 0.005
PRESSURE_NOISE_BAR = 0.01
MINUTE_NOISE = 0.03


class Hydraulics:
    """Turns district demand and incidents into district meter and pump station readings."""

    def __init__(
        self, connections: np.ndarray, mean_demand_lpm: np.ndarray, rng: np.random.Generator,
        pumps_per_station: int,
    ) -> None:
        d = len(connections)
        self._rng = rng
        self._pumps = pumps_per_station
        self.background_lpm = connections * BACKGROUND_LPH_PER_CONNECTION / 60 * rng.lognormal(
            0, BACKGROUND_SIGMA, d)
        """Each district's background leakage at nominal pressure, L/min."""
        peak = np.maximum((mean_demand_lpm + self.background_lpm) * PEAK_FACTOR, 50.0)
        self._p0 = rng.uniform(3.5, 5.5, d)
        self._pump_k = PUMP_LOSS_AT_PEAK_BAR / peak**2
        self._main_k = MAIN_LOSS_AT_PEAK_BAR / peak**2
        self._nominal_p = self._p0 - (self._pump_k + self._main_k) * (peak / PEAK_FACTOR) ** 2
        self._pump_capacity = 1.2 * peak / max(pumps_per_station - 1, 1)
        self._suction = rng.uniform(0.5, 1.5, d)
        self._pump_bias = 1 + rng.uniform(-0.01, 0.01, d)
        self._energy = rng.uniform(1e5, 1e6, d).round(1)
        self._running_h = rng.uniform(1e4, 6e4, d).round(1)

    def step(
        self, customer_litres: np.ndarray, network_leak_lpm: np.ndarray,
        burst_lpm: np.ndarray, burst_drop_bar: np.ndarray, minutes_per_sample: float,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """District meter and pump station metrics, each (district, sample), for one step.

        ``customer_litres`` is each district's customer consumption over the step; the
        other arrays are per (district, sample) from :meth:`Incidents.district_flows`.
        """
        d, samples = network_leak_lpm.shape
        rng = self._rng
        weights = 1 + MINUTE_NOISE * rng.standard_normal((d, samples))
        weights /= weights.mean(axis=1, keepdims=True)
        customers = customer_litres[:, None] / (samples * minutes_per_sample) * weights
        nominal = customers + self.background_lpm[:, None] + network_leak_lpm + burst_lpm
        pressure = self._pressure(nominal, burst_drop_bar)
        ratio = np.clip(pressure / self._nominal_p[:, None], 0.05, None)
        flow = (customers + burst_lpm + self.background_lpm[:, None] * ratio**BACKGROUND_EXPONENT
                + network_leak_lpm * ratio**NETWORK_LEAK_EXPONENT)
        pressure = self._pressure(flow, burst_drop_bar)
        outlet = self._p0[:, None] - self._pump_k[:, None] * flow**2
        suction = self._suction[:, None] - 1e-3 * flow / self._pump_capacity[:, None] + (
            PRESSURE_NOISE_BAR * rng.standard_normal((d, samples)))
        running = np.clip(np.ceil(flow / self._pump_capacity[:, None]), 1, self._pumps)
        kw = flow / 60_000 * (outlet - suction) * 1e5 / PUMP_EFFICIENCY / 1000
        hours = minutes_per_sample / 60
        energy = self._energy[:, None] + np.cumsum(kw * hours, axis=1)
        running_h = self._running_h[:, None] + np.cumsum(running * hours, axis=1)
        self._energy, self._running_h = energy[:, -1], running_h[:, -1]
        inlet = {
            "flow_lpm": flow * (1 + FLOW_NOISE * rng.standard_normal((d, samples))),
            "pressure_bar": pressure + PRESSURE_NOISE_BAR * rng.standard_normal((d, samples)),
        }
        pump = {
            "flow_lpm": flow * self._pump_bias[:, None] * (
                1 + FLOW_NOISE * rng.standard_normal((d, samples))),
            "inlet_pressure_bar": suction,
            "outlet_pressure_bar": outlet + PRESSURE_NOISE_BAR * rng.standard_normal(
                (d, samples)),
            "pumps_running_count": running,
            "energy_kwh": energy,
            "running_h": running_h,
        }
        return inlet, pump

    def _pressure(self, flow: np.ndarray, burst_drop_bar: np.ndarray) -> np.ndarray:
        loss = (self._pump_k + self._main_k)[:, None] * flow**2
        return np.clip(self._p0[:, None] - loss - burst_drop_bar, 0.0, None)
