"""ONNX export: dynamic batch, names, metadata, one self-contained file, the opset, and clear refusals."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from kiln_trainer import errors, export, measure

METADATA = {export.META_CLASS_NAMES: '["a", "b"]', export.META_PREPROCESSING: "{}"}


class DataDependentBranch(torch.nn.Module):
    """Takes a different path depending on the values it sees; a tracer would bake one path in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.flatten(1))
        if y.sum() > 0:
            return y
        return -y


class NoOnnxFunction(torch.nn.Module):
    """Uses an operator that has no ONNX translation (the Hurwitz zeta function)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.zeta(self.linear(x.flatten(1)).abs() + 2, torch.tensor(2.0))


def test_a_random_resnet18_exports_with_a_dynamic_batch_and_runs_at_batch_sizes_1_and_7(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    images = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "model.onnx"

    exported = export.export_onnx(model, images, path, opset=18, metadata=METADATA)

    assert exported.path == path and exported.opset == 18
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # weights inside, no .data file
    session = measure.open_session(path, threads=1)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 7):
        (logits,) = session.run(["logits"], {"input": images[:batch]})
        with torch.inference_mode():
            expected = model(torch.from_numpy(images[:batch])).numpy()
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert export.read_metadata(path) == METADATA


def test_the_exported_opset_follows_the_spec_within_what_onnxruntime_loads() -> None:
    ceiling = export.runtime_max_opset()
    assert ceiling >= 18
    assert export.resolve_opset(None) == 18
    assert export.resolve_opset(19) == 19
    assert export.resolve_opset(30) == ceiling
    assert export.resolve_opset(13) == 18  # torch's exporter writes nothing older


def test_the_runtime_opset_ceiling_is_the_newest_opset_onnxruntime_accepts() -> None:
    ceiling = export.runtime_max_opset()

    def loads(opset: int) -> bool:
        node = onnx.helper.make_node("Identity", ["x"], ["y"])
        value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        model = onnx.helper.make_model(
            onnx.helper.make_graph([node], "g", [value], [out]),
            ir_version=10,
            opset_imports=[onnx.helper.make_opsetid("", opset)],
        )
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    assert loads(ceiling)
    assert ceiling == onnx.defs.onnx_opset_version() or not loads(ceiling + 1)


@pytest.mark.parametrize(
    ("model", "cause"),
    [(DataDependentBranch(), "data-dependent"), (NoOnnxFunction(), "zeta")],
    ids=["data-dependent-branch", "no-onnx-function"],
)
def test_a_model_that_cannot_be_exported_faithfully_is_refused_with_a_clear_error(
    tmp_path: Path, model: torch.nn.Module, cause: str
) -> None:
    images = np.ones((2, 3, 8, 8), dtype=np.float32)
    with pytest.raises(errors.CompileError, match="cannot be exported to ONNX") as caught:
        export.export_onnx(model.eval(), images, tmp_path / "model.onnx", opset=18, metadata=METADATA)
    assert cause in str(caught.value)
    assert "\x1b[" not in str(caught.value)  # no terminal colour codes
    assert not (tmp_path / "model.onnx").exists()


def test_a_single_example_image_still_gives_a_dynamic_batch(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    images = np.zeros((1, 3, 8, 8), dtype=np.float32)
    export.export_onnx(model, images, tmp_path / "model.onnx", opset=18, metadata=METADATA)
    session = measure.open_session(tmp_path / "model.onnx", threads=1)
    assert session.run(None, {"input": np.zeros((3, 3, 8, 8), dtype=np.float32)})[0].shape == (3, 4)
