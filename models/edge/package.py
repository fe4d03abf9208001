"""Load and run an edge model package: ``model.onnx`` plus ``manifest.json``.

:func:`load_package` checks everything it can before a model may serve: the manifest reads
and holds the required fields, ``model.onnx`` has the sha256 the manifest (and, when given,
the model announcement) says, its input is one float32 matrix of ``len(feature_names)``
columns, and its outputs are a label and a class-probability matrix. It then creates one
onnxruntime session with one intra-op and one inter-op thread and warms it up. Anything
wrong raises :class:`ModelPackageError` naming the package and the problem, so a caller
(the edge agent) can reject the package and keep serving its current model.

Needs only numpy and onnxruntime (the edge install): no ``onnx``, no scikit-learn.
onnxruntime is imported by :func:`load_package`, not by importing this module: it costs ~19 MB
of RSS, which an edge agent without a model (telemetry only) does not pay.

>>> import tempfile
>>> load_package(tempfile.mkdtemp())  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
models.edge.package.ModelPackageError: model package ...: manifest.json is missing; ...
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.edge.features import WindowSpec

if TYPE_CHECKING:
    import onnxruntime as ort

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
MANIFEST_FORMAT = "meshwatch-edge-model/1"
"""The ``format`` field this loader reads."""
INPUT_NAME = "features"
"""The model's one input: a float32 matrix ``(windows, features)``."""
PROBABILITIES_OUTPUT = "probabilities"
"""The output holding class probabilities ``(windows, classes)``."""
NORMAL_CLASS = "normal"
"""The class whose probability is *not* the score: score = 1 - P(normal)."""

_REQUIRED = {"format": str, "model_id": str, "version": str, "feature_names": list,
             "classes": list, "window_spec": dict, "sha256": str}


class ModelPackageError(Exception):
    """A model package is missing, damaged or does not fit this code; the message says how."""


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` that serving needs; ``raw`` holds all of it."""

    model_id: str
    version: str
    feature_names: tuple[str, ...]
    classes: tuple[str, ...]
    window_spec: WindowSpec
    sha256: str
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Validate a parsed manifest; raises :class:`ModelPackageError`."""
        if not isinstance(data, dict):
            raise ModelPackageError(f"{where}: expected a JSON object")
        for key, kind in _REQUIRED.items():
            if not isinstance(data.get(key), kind):
                raise ModelPackageError(
                    f"{where}: field {key!r} is missing or not a {kind.__name__}")
        if data["format"] != MANIFEST_FORMAT:
            raise ModelPackageError(f"{where}: format is {data['format']!r}; this build reads "
                                    f"{MANIFEST_FORMAT!r}, so upgrade the agent or re-train")
        names, classes = data["feature_names"], data["classes"]
        if not names or not all(isinstance(name, str) for name in names):
            raise ModelPackageError(f"{where}: feature_names must be a non-empty list of names")
        if NORMAL_CLASS not in classes or len(classes) < 2:
            raise ModelPackageError(f"{where}: classes {classes!r} must include "
                                    f"{NORMAL_CLASS!r} and at least one other class")
        try:
            spec = WindowSpec.from_dict(data["window_spec"])
        except (TypeError, ValueError) as exc:
            raise ModelPackageError(f"{where}: window_spec is invalid: {exc}") from None
        return cls(data["model_id"], data["version"], tuple(names), tuple(map(str, classes)),
                   spec, data["sha256"].lower(), data)


class EdgeModel:
    """A loaded, verified model package; :meth:`score` scores windows in batches.

    Build with :func:`load_package`. ``score`` is the probability that a window is *not*
    normal (leak-like or fault-like), in [0, 1].
    """

    def __init__(self, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self._session = session
        self._outputs = [PROBABILITIES_OUTPUT]
        self._normal = manifest.classes.index(NORMAL_CLASS)
        self._width = len(manifest.feature_names)

    @property
    def model_id(self) -> str:
        """The model id from the manifest."""
        return self.manifest.model_id

    @property
    def version(self) -> str:
        """The model version from the manifest (goes into every ``EdgeScore``)."""
        return self.manifest.version

    @property
    def window_spec(self) -> WindowSpec:
        """The windows the model was trained on; feed it windows cut the same way."""
        return self.manifest.window_spec

    def probabilities(self, matrix: np.ndarray) -> np.ndarray:
        """Class probabilities ``(rows, classes)`` in :attr:`Manifest.classes` order."""
        rows = np.asarray(matrix, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self._width:
            msg = f"expected a (windows, {self._width}) matrix of features, got {rows.shape}"
            raise ValueError(msg)
        if not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows)
        result: np.ndarray = self._session.run(self._outputs, {INPUT_NAME: rows})[0]
        return result

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """The probability of not-normal for each row of ``matrix`` (float32, in [0, 1])."""
        normal = self.probabilities(matrix)[:, self._normal]
        return np.clip(1.0 - normal, 0.0, 1.0)


def load_package(
    directory: str | Path, expected_sha256: str | None = None,
    expected_features: Sequence[str] | None = None,
) -> EdgeModel:
    """Load, verify and warm up the package in ``directory``.

    ``expected_sha256`` (e.g. from a model announcement) must match ``model.onnx`` too;
    ``expected_features`` (e.g. :data:`models.edge.features.FEATURE_NAMES`) must equal the
    manifest's feature names and order.
    """
    where = f"model package {directory}"
    manifest = _read_manifest(Path(directory) / MANIFEST_FILE, where)
    model_bytes = _read_model(Path(directory) / MODEL_FILE, where)
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != manifest.sha256:
        raise ModelPackageError(f"{where}: {MODEL_FILE} has sha256 {digest}, the manifest "
                                f"says {manifest.sha256}; the file is damaged or replaced")
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ModelPackageError(f"{where}: {MODEL_FILE} has sha256 {digest}, the "
                                f"announcement says {expected_sha256}; not the announced model")
    if expected_features is not None and tuple(expected_features) != manifest.feature_names:
        raise ModelPackageError(
            f"{where}: the model expects features {list(manifest.feature_names)}, this build "
            f"computes {list(expected_features)}; re-train or upgrade the agent")
    model = EdgeModel(manifest, _session(model_bytes, manifest, where))
    _warm_up(model, where)
    return model


def _read_manifest(path: Path, where: str) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelPackageError(f"{where}: {MANIFEST_FILE} is missing; a package holds "
                                f"{MANIFEST_FILE} and {MODEL_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelPackageError(f"{where}: cannot read {MANIFEST_FILE}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelPackageError(f"{where}: {MANIFEST_FILE} is not valid JSON: {exc}") from None
    return Manifest.from_dict(data, f"{where}: {MANIFEST_FILE}")


def _read_model(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelPackageError(f"{where}: {MODEL_FILE} is missing") from None
    except OSError as exc:
        raise ModelPackageError(f"{where}: cannot read {MODEL_FILE}: {exc}") from None


def _session(model_bytes: bytes, manifest: Manifest, where: str) -> ort.InferenceSession:
    import onnxruntime as ort  # here, not at module level: see the module docs

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; a bad model raises below anyway
    try:
        session = ort.InferenceSession(model_bytes, options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several private exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelPackageError(f"{where}: {MODEL_FILE} is not a model onnxruntime can "
                                f"load: {first_line}") from None
    inputs = session.get_inputs()
    width = len(manifest.feature_names)
    if len(inputs) != 1:
        raise ModelPackageError(f"{where}: the model has {len(inputs)} inputs; expected one "
                                f"named {INPUT_NAME!r}")
    signature = inputs[0]
    shape = list(signature.shape)
    if (signature.name != INPUT_NAME or signature.type != "tensor(float)" or len(shape) != 2
            or shape[1] != width or isinstance(shape[0], int)):
        raise ModelPackageError(
            f"{where}: the model's input is {signature.name!r} {signature.type} {shape}; "
            f"expected {INPUT_NAME!r} tensor(float) [N, {width}] ({width} features in the "
            "manifest, any number of windows N)")
    outputs = {output.name: output for output in session.get_outputs()}
    probabilities = outputs.get(PROBABILITIES_OUTPUT)
    if probabilities is None or probabilities.type != "tensor(float)":
        raise ModelPackageError(
            f"{where}: the model has no float tensor output {PROBABILITIES_OUTPUT!r} "
            f"(outputs: {sorted(outputs)}); export with options zipmap=False")
    return session


def _warm_up(model: EdgeModel, where: str) -> None:
    """Run the session once per batch shape and check what it returns."""
    classes = len(model.manifest.classes)
    for rows in (1, 16):
        try:
            result = model.probabilities(np.zeros((rows, len(model.manifest.feature_names)),
                                                  np.float32))
        except Exception as exc:  # a model that fails on a valid input must not serve
            raise ModelPackageError(f"{where}: the model failed on a test input: {exc}") \
                from None
        if result.shape != (rows, classes) or not np.all(np.isfinite(result)):
            raise ModelPackageError(
                f"{where}: the model returned probabilities of shape {result.shape} for "
                f"{rows} windows; expected ({rows}, {classes}) finite values")
        if not math.isclose(float(result[0].sum()), 1.0, abs_tol=1e-3):
            raise ModelPackageError(f"{where}: the model's class probabilities do not sum "
                                    "to 1; is the output really probabilities?")
