"""The generic detector against plain river HalfSpaceTrees, side by side, plus scoring speed.

Run: python bench/bench_generic_detector.py [--seeds 5] [--n 4000] [--rows 100000]

Quality: every family of :mod:`models.anomaly.synthetic` (several seeds each, so the sampling
step, noise, tails and cycle change) is streamed through

- ``SeasonalResidualDetector()`` with default settings (score, then learn unless flagged), and
- ``MinMaxScaler() | HalfSpaceTrees(seed=s)`` on the value, as users typically set it up
  (score_one, then learn_one on every reading; river's defaults);

both see the same readings ``{"ts_ms", "value"}``. Per family, the mean over seeds of:
ROC-AUC (point-wise), best F1 (point-wise, best threshold chosen in hindsight), and a NAB-like
early-detection reward: at the threshold where 1 % of normal readings alarm, every labelled
event (a run of labelled readings, plus 3 readings of tolerance) earns
``2 / (1 + exp(5 y)) - 1`` for its first alarm at relative position ``y`` in [-1, 0] (earlier
is better, about 0.99 at the start and 0 at the end), or -1 if missed; averaged over events.
For the generic detector the table also gives its alarm rate on normal readings at its own
threshold 0.9 (nominal: about 1 in 4,000 = 0.025 %), which is what calibration promises.

Speed: score+learn rows/s of both models in process, and ``meshwatch score`` on a CSV of
``--rows`` rows of one column (timestamp, value), run in-process (parse, check pass, score,
write), best of 3; and the pickled state size of one detector after a long stream.
"""

from __future__ import annotations

import argparse
import math
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meshwatch.cli import main as meshwatch_main
from models.anomaly.generic import SeasonalResidualDetector
from models.anomaly.synthetic import FAMILIES, series
from models.checks import best_f1, roc_auc

TOLERANCE = 3
FPR = 0.01


def events(labels: list[bool]) -> list[tuple[int, int]]:
    """Labelled runs as (start, end exclusive)."""
    out, start = [], None
    for i, label in enumerate([*labels, False]):
        if label and start is None:
            start = i
        elif not label and start is not None:
            out.append((start, i))
            start = None
    return out


def nab_like(scores: list[float], labels: list[bool]) -> float:
    runs = events(labels)
    near = [False] * len(labels)
    for start, end in runs:
        for i in range(start, min(len(labels), end + TOLERANCE)):
            near[i] = True
    normal = sorted((s for s, n in zip(scores, near, strict=True) if not n), reverse=True)
    threshold = normal[int(FPR * len(normal))] if normal else 1.0
    rewards = []
    for start, end in runs:
        stop = min(len(labels), end + TOLERANCE)
        first = next((i for i in range(start, stop) if scores[i] > threshold), None)
        if first is None:
            rewards.append(-1.0)
        else:
            y = (first - stop) / (stop - start)  # -1 at the start of the window, 0 at its end
            rewards.append(2.0 / (1.0 + math.exp(5.0 * y)) - 1.0)
    return statistics.fmean(rewards)


def run_generic(ts: list[int], values: list[float]) -> list[float]:
    detector = SeasonalResidualDetector()
    return [detector.score_learn_one({"ts_ms": t, "value": v}) for t, v in zip(ts, values,
                                                                             strict=True)]


def run_hst(values: list[float], seed: int) -> list[float]:
    from river import anomaly, preprocessing

    model = preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=seed)
    scores = []
    for v in values:
        x = {"value": v}
        scores.append(float(model.score_one(x)))
        model.learn_one(x)
    return scores


def quality(seeds: int, n: int) -> Table:
    table = Table("family", "ROC-AUC generic", "ROC-AUC HST", "best F1 generic", "best F1 HST",
                  "NAB-like generic", "NAB-like HST", "generic alarms on normal @0.9",
                  title=f"generic detector vs MinMaxScaler|HalfSpaceTrees "
                        f"(mean of {seeds} seeds, {n} readings each)")
    totals: dict[str, list[float]] = {k: [] for k in ("ag", "ah", "fg", "fh", "ng", "nh")}
    for family in FAMILIES:
        rows: dict[str, list[float]] = {k: [] for k in totals}
        false_alarms = normals = 0
        for seed in range(seeds):
            s = series(family, seed=seed, n=n)
            generic = run_generic(s.ts_ms, s.values)
            hst = run_hst(s.values, seed)
            for key, scores in (("g", generic), ("h", hst)):
                rows["a" + key].append(roc_auc(scores, s.labels))
                rows["f" + key].append(best_f1(scores, s.labels))
                rows["n" + key].append(nab_like(scores, s.labels))
            near = set()
            for start, end in events(s.labels):
                near.update(range(start, end + TOLERANCE))
            warm = n // 4
            for i in range(warm, n):
                if i not in near:
                    normals += 1
                    false_alarms += generic[i] >= 0.9
        means = {k: statistics.fmean(v) for k, v in rows.items()}
        for k, v in means.items():
            totals[k].append(v)
        table.add_row(family, *(f"{means[k]:.3f}" for k in ("ag", "ah", "fg", "fh", "ng", "nh")),
                      f"{100 * false_alarms / normals:.3f} %")
    table.add_row("[bold]all families[/bold]",
                  *(f"[bold]{statistics.fmean(totals[k]):.3f}[/bold]"
                    for k in ("ag", "ah", "fg", "fh", "ng", "nh")), "")
    return table


def speed(rows: int) -> tuple[float, int]:
    s = series("seasonal_spikes", seed=0, n=rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.csv"
        out = Path(tmp) / "out.csv"
        with path.open("w") as f:
            f.write("timestamp,value\n")
            for t, v in zip(s.ts_ms, s.values, strict=True):
                f.write(f"{t},{v:.4f}\n")
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            code = meshwatch_main(["score", str(path), "--out", str(out)])
            best = min(best, time.perf_counter() - start)
            assert code == 0, code
    detector = SeasonalResidualDetector()
    for t, v in zip(s.ts_ms, s.values, strict=True):
        detector.learn_one({"ts_ms": t, "value": v})
    return rows / best, len(pickle.dumps(detector))


def model_rates(rows: int = 20_000) -> tuple[float, float]:
    """Rows per second of score+learn, in process, best of 3: the generic detector and the HST
    pipeline, on the same series."""
    s = series("seasonal_spikes", seed=1, n=rows)
    generic = hst = math.inf
    for _ in range(3):
        start = time.perf_counter()
        run_generic(s.ts_ms, s.values)
        generic = min(generic, time.perf_counter() - start)
        start = time.perf_counter()
        run_hst(s.values, 1)
        hst = min(hst, time.perf_counter() - start)
    return rows / generic, rows / hst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    console = Console(width=200)
    console.print(quality(args.seeds, args.n))
    generic, hst = model_rates()
    console.print(f"score+learn in process, one column: generic {generic:,.0f} rows/s, "
                  f"MinMaxScaler|HalfSpaceTrees {hst:,.0f} rows/s")
    if args.rows:
        rate, size = speed(args.rows)
        console.print(f"meshwatch score: {args.rows:,} rows of one column in "
                      f"{args.rows / rate:.2f} s = {rate:,.0f} rows/s (best of 3)")
        console.print(f"state of one single-column detector after {args.rows:,} rows: "
                      f"{size:,} bytes pickled")


if __name__ == "__main__":
    main()
