"""ONNX export: a trained PyTorch model to one self-contained ``model.onnx`` with a dynamic batch dimension.

The exporter is torch's ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``), on purpose:

- it is sound: ``torch.export`` either captures the whole forward pass or refuses (data-dependent control
  flow, an op without an ONNX function), while the TorchScript tracer (``dynamo=False``) silently bakes in
  whichever branch the example input took;
- it is torch's default since 2.9, and the tracer warns "The feature will be removed";
- with torch 2.15 it exported small-cnn, resnet18, resnet50, mobilenet_v3_small and efficientnet_b0 with a
  dynamic batch, and onnxruntime matched PyTorch to <= 7e-6 on every one (measured at 32x32, batch 1 and 7).

Its cost is export time (resnet50 took ~20 s on two shared cores against ~3 s for the tracer), paid once.
It builds opset 18 or higher: a lower request is raised to 18, and the opset actually written is returned.
"""

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kiln_trainer import errors

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
# The lowest opset torch's exporter writes; a lower request is exported at this one.
MIN_EXPORTER_OPSET = 18
# Metadata keys stored in every compiled model (metadata_props), so a model file explains itself.
META_CLASS_NAMES = "class_names"
META_PREPROCESSING = "preprocessing"
META_VARIANT = "kiln_variant"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The exporter's graph passes narrate every step at INFO.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript")


@dataclass(frozen=True)
class Exported:
    """What was written: the file, the opset it carries and the exporter that wrote it."""

    path: Path
    opset: int
    exporter: str


@functools.cache
def runtime_max_opset() -> int:
    """The newest ONNX opset the installed onnxruntime loads, probed with a one-node model.

    onnxruntime has no API for it, and it trails onnx (onnx 1.23 defines opset 28, onnxruntime 1.31 loads
    up to 26); a model stamped newer than the runtime supports fails to load at serving time.
    """
    for opset in range(onnx.defs.onnx_opset_version(), MIN_EXPORTER_OPSET - 1, -1):
        ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version
        )
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own Fail/InvalidGraph types for an unknown opset
            continue
        return opset
    return MIN_EXPORTER_OPSET


def resolve_opset(requested: int | None) -> int:
    """The opset to export at: the spec's (default 18), at least 18, at most what onnxruntime loads."""
    wanted = requested or DEFAULT_OPSET
    ceiling = runtime_max_opset()
    if wanted > ceiling:
        log.warning(
            "export: opset %d requested, onnxruntime %s loads up to %d; using %d",
            wanted,
            ort.__version__,
            ceiling,
            ceiling,
        )
        return ceiling
    if wanted < MIN_EXPORTER_OPSET:
        log.warning(
            "export: opset %d requested, torch's exporter writes %d or newer; using %d",
            wanted,
            MIN_EXPORTER_OPSET,
            MIN_EXPORTER_OPSET,
        )
        return MIN_EXPORTER_OPSET
    return wanted


def _failure_summary(err: BaseException) -> str:
    """The one line of torch's long export error that says what went wrong."""
    text = _ANSI.sub("", str(err))
    lines = [line.strip() for line in text.splitlines()]
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1 :] if line]
        if after:
            return after[0][:400]
    cause = err.__cause__
    first = next((line for line in lines if line), type(err).__name__)
    if cause is not None:
        return f"{first} ({type(cause).__name__}: {_ANSI.sub('', str(cause)).splitlines()[0][:300]})"
    return first[:400]


def stamp_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Set metadata_props on a model file in place (quantizers and converters drop or ignore them)."""
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(metadata)
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, str]:
    """A model file's metadata_props as a dict."""
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset a model is stamped with."""
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _check_interface(model: onnx.ModelProto, path: Path) -> None:
    """One input named ``input`` with a symbolic batch dimension, one output named ``logits``."""
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise errors.CompileError(
            f"export: {path} has inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in model.graph.output]}; the model must take one image tensor and return one "
            "tensor of logits"
        )
    batch = inputs[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise errors.CompileError(
            f"export: {path} has a fixed batch size ({batch.dim_value}); expected a dynamic batch dimension"
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hold the exporter's own loggers at WARNING while it runs, then restore them."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(
    model: torch.nn.Module, example: np.ndarray, path: Path, *, opset: int, metadata: Mapping[str, str]
) -> Exported:
    """Export ``model`` (CPU, eval mode) to ``path`` with a dynamic batch, check it, stamp the metadata.

    ``example`` is one or more real input images (NCHW float32); two are used, because torch.export
    specialises a dimension of size 1 into a constant.
    """
    model = model.eval()
    sample = np.repeat(example[:1], 2, axis=0) if len(example) < 2 else example[:2]
    args = (torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)),)
    batch = torch.export.Dim("batch", min=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                external_data=False,  # one self-contained file; the default writes model.onnx + model.onnx.data
                dynamo=True,
                verbose=False,
            )
    except Exception as err:  # torch.export and the ONNX translator raise many types
        path.unlink(missing_ok=True)
        raise errors.CompileError(f"export: the model cannot be exported to ONNX: {_failure_summary(err)}") from err
    exported = onnx.load(str(path))
    try:
        onnx.checker.check_model(exported, full_check=True)
    except onnx.checker.ValidationError as err:
        raise errors.CompileError(f"export: onnx.checker rejects {path}: {str(err).splitlines()[0]}") from err
    _check_interface(exported, path)
    stamp_metadata(path, metadata)
    written = model_opset(exported)
    log.info("export: wrote %s (opset %d, %.1f MB)", path, written, path.stat().st_size / 1e6)
    return Exported(path=path, opset=written, exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}")
