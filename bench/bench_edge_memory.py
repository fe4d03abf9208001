"""Where the edge agent's RSS goes: imports step by step, the model session, per-device state.

Run: ``python bench/bench_edge_memory.py [--model DIR]`` (trains a small model without one).

RSS is VmRSS from ``/proc/self/status`` (anonymous + file-backed pages: shared libraries count
too, as they do in ``ru_maxrss``); tracemalloc would miss numpy's and onnxruntime's native
memory. The imports run in one fresh interpreter in the order ``meshwatch edge`` imports them,
so each step shows what it adds on top of the previous ones (a module shared by two steps
counts in the first). The run itself (blocks, outbox, publisher) is measured by
``bench/bench_edge_agent.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STEPS: list[tuple[str, str]] = [
    ("meshwatch.cli (argparse, rich.console, importlib.metadata)", "import meshwatch.cli"),
    ("numpy", "import numpy"),
    ("ssl (paho imports it)", "import ssl"),
    ("paho-mqtt", "import paho.mqtt.client"),
    ("pydantic (BaseModel)", "import pydantic.main"),
    ("pydantic-settings (asyncio, email, dotenv...)", "import pydantic_settings"),
    ("meshwatch.config + meshwatch.contract", "import meshwatch.config, meshwatch.contract"),
    ("sqlite3 + edge_agent.outbox", "import edge_agent.outbox"),
    ("edge_agent.command (the rest of the agent)", "import edge_agent.command"),
    ("onnxruntime (with edge.model_dir)", "import onnxruntime"),
    ("the model's InferenceSession, warmed up", "models.edge.package.load_package(MODEL)"),
]

_PROBE = """
import json, sys
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
print(json.dumps(["python interpreter", rss()]), flush=True)
MODEL = sys.argv[1]
for label, code in json.loads(sys.argv[2]):
    exec(code)
    print(json.dumps([label, rss()]), flush=True)
"""


def import_steps(model: Path) -> list[tuple[str, dict[str, float]]]:
    """Cumulative RSS after each step, in one interpreter."""
    steps = [*STEPS[:-1], (STEPS[-1][0], "import models.edge.package; " + STEPS[-1][1])]
    result = subprocess.run([sys.executable, "-c", _PROBE, str(model), json.dumps(steps)],
                            capture_output=True, text=True, check=True, cwd=REPO)
    return [tuple(json.loads(line)) for line in result.stdout.splitlines()]  # type: ignore[misc]


def window_state(devices: int = 5000) -> dict[str, float]:
    """Bytes per device of the feature windows (numpy state, id index)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from models.edge.features import FeatureWindows

    windows = FeatureWindows()
    ids = [f"mtr-{i:07d}" for i in range(devices)]
    slots = windows.slots(ids)
    windows.add(slots, np.full(devices, 1_767_571_200_000), np.ones(devices))
    arrays = windows._state.nbytes + windows._open.nbytes + windows._floor.nbytes
    used = arrays * devices / len(windows._open)
    index = (sys.getsizeof(windows._index) + sys.getsizeof(windows._ids)
             + sum(sys.getsizeof(i) for i in ids) + windows._id_array.nbytes)
    return {"devices": devices, "capacity": len(windows._open), "arrays_bytes": arrays,
            "per_device_arrays": used / devices, "per_device_index": index / devices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an edge model package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "model"
            subprocess.run([sys.executable, "-m", "meshwatch.cli", "train", "edge", "--meters",
                            "600", "--days", "3", "--out", str(model), "--quiet"], check=True)
        steps = import_steps(model)
    print("| step | adds MB | of which file-backed | RSS after, MB |")
    print("|---|---:|---:|---:|")
    previous = None
    for label, rss in steps:
        if previous is None:
            print(f"| {label} | {rss['VmRSS']:.1f} | {rss['RssFile']:.1f} | {rss['VmRSS']:.1f} |")
        else:
            print(f"| {label} | {rss['VmRSS'] - previous['VmRSS']:.1f} |"
                  f" {rss['RssFile'] - previous['RssFile']:.1f} | {rss['VmRSS']:.1f} |")
        previous = rss
    state = window_state()
    print(f"\nFeature windows, {state['devices']:,} devices: {state['per_device_arrays']:.0f}"
          f" bytes/device of numpy state ({state['arrays_bytes'] / 1e6:.2f} MB allocated for"
          f" {state['capacity']:,} slots) + {state['per_device_index']:.0f} bytes/device of"
          " id index (dict, id strings).")


if __name__ == "__main__":
    main()
