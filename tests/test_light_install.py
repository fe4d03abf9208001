"""The edge install stays light: `meshwatch[edge]` brings no bytewax, river or scikit-learn.

Two checks: the dependency closure of the `edge` extra, resolved from the installed
distributions' metadata, holds none of the heavy packages; and importing every edge-agent
module in a fresh interpreter loads none of them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

HEAVY_DISTRIBUTIONS = {"bytewax", "river", "scikit-learn", "skl2onnx", "scipy", "pyarrow",
                       "pandas", "torch"}
HEAVY_MODULES = ("sklearn", "skl2onnx", "river", "bytewax", "pyarrow", "scipy", "pandas")
EDGE_MODULES = ("edge_agent.command", "edge_agent.agent", "edge_agent.scoring",
                "edge_agent.opcua_input", "edge_agent.metrics", "edge_agent.batcher",
                "models.edge.features", "models.edge.package")


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _closure(extra: str) -> set[str]:
    """Distributions that `pip install meshwatch[extra]` installs (markers for this Python)."""
    wanted = [r for r in metadata.requires("meshwatch") or []
              if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": extra})]
    seen: set[str] = set()
    while wanted:
        requirement = Requirement(wanted.pop())
        name = _name(str(requirement))
        if name in seen or name == "meshwatch":
            if name == "meshwatch":  # a self-reference such as meshwatch[sim]
                for sub in requirement.extras:
                    wanted += [r for r in metadata.requires("meshwatch") or []
                               if Requirement(r).marker is not None
                               and Requirement(r).marker.evaluate({"extra": sub})]
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        wanted += [r for r in requires if Requirement(r).marker is None
                   or Requirement(r).marker.evaluate({"extra": ""})]
    return seen


def test_the_edge_extra_installs_no_heavy_distribution() -> None:
    closure = _closure("edge")
    assert {"onnxruntime", "paho-mqtt", "asyncua", "numpy"} <= closure
    assert not closure & HEAVY_DISTRIBUTIONS, sorted(closure & HEAVY_DISTRIBUTIONS)
    assert {"bytewax", "river", "scikit-learn"} <= _closure("dev")  # the check can fail


def _loaded_by_importing(modules: tuple[str, ...]) -> set[str]:
    """The names in sys.modules after importing ``modules`` in a fresh interpreter."""
    code = ("import sys, json\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parent.parent)
    return set(json.loads(result.stdout))


def test_importing_the_edge_agent_loads_no_heavy_module() -> None:
    loaded = _loaded_by_importing(EDGE_MODULES)
    assert {"paho", "numpy"} <= loaded
    assert "asyncua" not in loaded  # only once OPC-UA is configured
    assert not loaded & set(HEAVY_MODULES), sorted(loaded & set(HEAVY_MODULES))


def test_the_agent_imports_what_it_serves_only_when_configured() -> None:
    """RSS on a gateway: onnxruntime (~30 MB with its session) only with a model, etc."""
    loaded = _loaded_by_importing(("edge_agent.command", "edge_agent.agent"))
    lazy = {"onnxruntime", "asyncua", "prometheus_client", "rich", "simulators"}
    assert not loaded & lazy, sorted(loaded & lazy)
    assert "meshwatch.contract.wire" in loaded  # outgoing events go straight to bytes
