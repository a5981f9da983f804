"""A model to be served on a GPU gets int8-static twice: U8S8 for the CPU, and a graph TensorRT takes
(symmetric int8 activations and weights, every zero point 0), recorded in the card beside the CPU one."""

from pathlib import Path

import numpy as np
import onnx
import trainer_support as support
from onnx import numpy_helper

from kiln import api
from kiln.api import constants
from kiln_trainer import compile as compiler
from kiln_trainer import measure


def _zero_points(path: Path) -> list[np.ndarray]:
    """The zero-point initializers of every QuantizeLinear and DequantizeLinear node."""
    graph = onnx.load(str(path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    names = {n.input[2] for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    return [initializers[name] for name in sorted(names) if name in initializers]


def _compile(tmp_path: Path, *, serve_on_gpu: bool) -> api.ModelCard:
    spec = api.TrainingJobSpec.model_validate({"export": {"variants": ["fp32", "int8-static"]}})
    inputs = support.compile_inputs(support.TinyNet())
    return compiler.compile_model(spec, inputs, tmp_path, "tiny", serve_on_gpu=serve_on_gpu, repeats=1, threads=1)


def test_serving_on_a_gpu_adds_a_symmetric_int8_graph_for_tensorrt_beside_the_cpu_one(tmp_path: Path) -> None:
    card = _compile(tmp_path, serve_on_gpu=True)
    int8 = card.variant("int8-static")
    assert int8.tensorrt_path == f"{constants.MODELS_DIR}/int8-static/{constants.TENSORRT_MODEL_FILE}"
    tensorrt = tmp_path / int8.tensorrt_path
    assert int8.tensorrt_sha256 == api.file_sha256(tensorrt)

    points = _zero_points(tensorrt)
    assert points, "the TensorRT graph has no Q/DQ zero points"
    assert {p.dtype for p in points} == {np.dtype(np.int8)}
    assert all(not p.any() for p in points)
    # The CPU graph keeps unsigned activations with their own zero points.
    cpu = _zero_points(tmp_path / int8.path)
    assert np.dtype(np.uint8) in {p.dtype for p in cpu}

    # The TensorRT graph is a valid model: onnxruntime's CPU provider runs symmetric QDQ too.
    images = support.compile_inputs(support.TinyNet()).val_images
    ours = measure.predict(measure.open_session(tensorrt, threads=1), images)
    assert ours.shape == (len(images), 3) and np.isfinite(ours).all()


def test_a_model_served_on_the_cpu_gets_no_tensorrt_graph(tmp_path: Path) -> None:
    card = _compile(tmp_path, serve_on_gpu=False)
    assert card.variant("int8-static").tensorrt_path is None
    assert not list(tmp_path.rglob(constants.TENSORRT_MODEL_FILE))
