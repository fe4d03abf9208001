"""The edge model: training, ONNX export, the package loader and the light edge import."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SMALL_EDGE_TRAINING
from onnx import TensorProto, helper

from meshwatch.cli import main
from models.edge.features import FEATURE_NAMES
from models.edge.package import ModelPackageError, load_package
from models.edge.train import CLASSES, train_edge_model

WIDTH = len(FEATURE_NAMES)


@pytest.fixture
def trained(trained_edge_model):
    return trained_edge_model


@pytest.fixture
def package(edge_model_dir) -> Path:
    return edge_model_dir


@pytest.fixture
def copy(package, tmp_path) -> Path:
    target = tmp_path / "pkg"
    shutil.copytree(package, target)
    return target


def test_onnx_matches_scikit_learn_on_held_out_windows(trained, package):
    model = load_package(package)
    expected = trained.model.predict_proba(trained.test_features)
    assert len(trained.test_features) > 1000
    np.testing.assert_allclose(model.probabilities(trained.test_features), expected,
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.score(trained.test_features), 1 - expected[:, 0],
                               atol=1e-5, rtol=0)


def test_package_round_trip(trained, package):
    manifest = json.loads((package / "manifest.json").read_text())
    model = load_package(package, expected_sha256=manifest["sha256"].upper(),
                         expected_features=FEATURE_NAMES)
    assert (model.model_id, model.version) == ("edge-rf", manifest["version"])
    assert model.window_spec == SMALL_EDGE_TRAINING.window
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["classes"] == list(CLASSES)
    assert manifest["sha256"] == hashlib.sha256((package / "model.onnx").read_bytes()).hexdigest()
    assert manifest["training"]["seed"] == SMALL_EDGE_TRAINING.seed
    assert len(manifest["training"]["data_sha256"]) == 64
    assert manifest["created_at"].endswith("+00:00")
    scores = model.score(trained.test_features[:100])
    assert scores.shape == (100,)
    assert ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match=r"\(windows, 15\)"):
        model.score(np.zeros((2, 3), np.float32))


def test_held_out_metrics_beat_chance(trained):
    metrics = trained.manifest["metrics"]
    leak = metrics["per_class"]["leak_like"]
    assert leak["support"] > 50
    assert leak["precision"] > 5 * leak["base_rate"]
    assert leak["f1"] > 2 * leak["base_rate"]  # a coin weighted by the base rate scores ~that
    assert metrics["not_normal"]["precision"] > 0.5


def test_same_seed_same_model_and_metrics(trained):
    again = train_edge_model(SMALL_EDGE_TRAINING)
    assert again.onnx_bytes == trained.onnx_bytes
    for key in ("metrics", "training", "sha256", "version"):
        assert again.manifest[key] == trained.manifest[key]


def write_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def onnx_model(name="features", elem=TensorProto.FLOAT, width=WIDTH, batch=None) -> bytes:
    """A stand-in model: ``probabilities`` = softmax of the first three input columns."""
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["head"]),
             helper.make_node("Cast", ["head"], ["cast"], to=TensorProto.FLOAT),
             helper.make_node("Softmax", ["cast"], ["probabilities"], axis=1)]
    nodes[0].input[0] = name
    graph = helper.make_graph(
        nodes, "stand_in", [helper.make_tensor_value_info(name, elem, [batch, width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
         helper.make_tensor("ends", TensorProto.INT64, [1], [3]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def replace_model(directory: Path, data: bytes) -> None:
    (directory / "model.onnx").write_bytes(data)
    write_manifest(directory, sha256=hashlib.sha256(data).hexdigest())


def test_a_valid_stand_in_model_loads(copy):
    replace_model(copy, onnx_model())
    assert load_package(copy).score(np.zeros((4, 15), np.float32)).shape == (4,)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "model.onnx").unlink(), "model.onnx is missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[]"), "expected a JSON object"),
    (lambda d: write_manifest(d, feature_names=None), "'feature_names' is missing"),
    (lambda d: write_manifest(d, format="other/9"), "this build reads"),
    (lambda d: write_manifest(d, window_spec={"length_ms": 7}), "window_spec is invalid"),
    (lambda d: write_manifest(d, classes=["leak_like", "fault_like"]), "must include 'normal'"),
    (lambda d: write_manifest(d, sha256="0" * 64), "the manifest says 0000"),
    (lambda d: (d / "model.onnx").write_bytes(b"\0" * 64), "has sha256"),
    (lambda d: replace_model(d, b"not an onnx model"), "not a model onnxruntime can load"),
    (lambda d: write_manifest(d, feature_names=["a", "b"]), r"\[N, 2\] \(2 features"),
    (lambda d: replace_model(d, onnx_model(width=14)), r"tensor\(float\) \[None, 14\]"),
    (lambda d: replace_model(d, onnx_model(elem=TensorProto.DOUBLE)), r"tensor\(double\)"),
    (lambda d: replace_model(d, onnx_model(batch=1)), "any number of windows"),
    (lambda d: replace_model(d, onnx_model(name="input")), r"'input' tensor\(float\)"),
])
def test_bad_packages_are_rejected_with_the_reason(copy, damage, message):
    damage(copy)
    with pytest.raises(ModelPackageError, match=message) as caught:
        load_package(copy)
    assert str(copy) in str(caught.value)


def test_announced_checksum_and_feature_order_are_enforced(package):
    with pytest.raises(ModelPackageError, match="the announcement says abc"):
        load_package(package, expected_sha256="abc")
    with pytest.raises(ModelPackageError, match="re-train or upgrade"):
        load_package(package, expected_features=FEATURE_NAMES[::-1])


def test_train_cli_writes_a_valid_package(tmp_path):
    out = tmp_path / "pkg"
    argv = ["train", "edge", "--meters", "300", "--days", "2", "--districts", "3",
            "--trees", "5", "--window-min", "30", "--out", str(out)]
    assert main(argv) == 0
    model = load_package(out, expected_features=FEATURE_NAMES)
    assert model.window_spec.length_ms == 30 * 60_000
    assert json.loads((out / "manifest.json").read_text())["training"]["meters"] == 300
    assert not list(out.glob(".*")), "no temporary files left behind"


@pytest.mark.parametrize(("option", "message"), [
    (["--districts", "1"], "districts is 1"),
    (["--night", "1am-4am"], "--night is '1am-4am'"),
    (["--window-min", "7"], "length_ms is 420000"),
    (["--model-id", "no spaces"], "model_id is 'no spaces'"),
])
def test_train_cli_rejects_bad_options(tmp_path, capsys, option, message):
    assert main(["train", "edge", "--out", str(tmp_path), *option]) == 2
    assert message in capsys.readouterr().err
