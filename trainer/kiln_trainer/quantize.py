"""Reduced-precision variants of the fp32 ONNX model, built with onnxruntime's and onnxconverter-common's
tooling only: fp16 (for GPU serving), int8-dynamic and int8-static (QDQ, calibrated on real images).

int8 activations are unsigned and weights signed (U8S8). With onnxruntime's default S8S8 only 9 of
resnet18's 20 Convs fused into QLinearConv and the model ran no faster than fp32; with U8S8 all of them
fused and it ran ~3x faster. On x86 CPUs without VNNI the U8S8 multiply (VPMADDUBSW) can saturate, so there
weights are quantized to 7 bits (``reduce_range``), as onnxruntime's quantization guide advises.

TensorRT takes only symmetric int8 (signed activations and weights, zero points 0) and refuses U8S8 graphs,
so a model to be served on a GPU gets a second int8-static graph for TensorRT (``TENSORRT_INT8``).
"""

import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxconverter_common import float16
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
from onnxruntime.quantization import quantize_static as ort_quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from kiln_trainer import errors, export

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686"})


@dataclass(frozen=True)
class Int8Settings:
    """How int8 variants are quantized for where they run, and why (the note is stored in the model)."""

    reduce_range: bool
    note: str
    activations: QuantType = QuantType.QUInt8
    # Zero points 0 for activations (weights are symmetric QInt8 either way).
    symmetric: bool = False
    # int32 biases behind a DequantizeLinear (onnxruntime's kernels fuse them); TensorRT keeps biases float.
    quantize_bias: bool = True


# TensorRT's explicit quantization: S8S8, symmetric, full 8-bit range, float biases.
TENSORRT_INT8 = Int8Settings(reduce_range=False, note="S8S8 symmetric (TensorRT)", activations=QuantType.QInt8,
                             symmetric=True, quantize_bias=False)  # fmt: skip


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is missing or has none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_settings(flags: frozenset[str] | None = None, machine: str | None = None) -> Int8Settings:
    """U8S8 everywhere; on x86 without a VNNI instruction, 7-bit weights so the int8 dot product cannot
    saturate."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return Int8Settings(reduce_range=False, note=f"U8S8 ({machine})")
    vnni = sorted(flags & VNNI_FLAGS)
    if vnni:
        return Int8Settings(reduce_range=False, note=f"U8S8 (CPU has {', '.join(vnni)})")
    return Int8Settings(reduce_range=True, note="U8S8 with reduce_range (x86 CPU without VNNI)")


class ArrayReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    """Feeds calibration images to onnxruntime's calibrator in batches, once."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self._batches = [
            np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32)
            for i in range(0, len(images), batch_size)
        ]
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {export.INPUT_NAME: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's pre-quantization pass (shape inference and graph optimisation), which its guide asks
    for before quantizing. Symbolic shape inference gives up on some graphs; ONNX's own then suffices."""
    try:
        quant_pre_process(str(src), str(dst))
    except Exception as err:  # the symbolic shape inferer raises bare Exceptions on ops it does not know
        log.info("quantize: symbolic shape inference failed (%s); retrying without it", err)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def convert_fp16(src: Path, dst: Path) -> Path:
    """Weights and activations in float16, inputs and outputs still float32 (``keep_io_types``), so clients
    send the same tensors to every variant."""
    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def quantize_int8_dynamic(pre: Path, dst: Path, settings: Int8Settings) -> Path:
    """int8 weights, activations quantized at run time. Meant for transformers and LSTMs; on CNNs it runs
    as ConvInteger and is usually slower than fp32 (kept as a variant, never chosen for being slower)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    ort_quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, reduce_range=settings.reduce_range)
    return dst


def quantize_int8_static(
    pre: Path, dst: Path, images: np.ndarray, *, method: str, settings: Int8Settings, batch_size: int = 16
) -> Path:
    """QDQ int8 with per-channel weights, activation ranges calibrated on ``images`` (real training images,
    preprocessed exactly like serving input) with ``method`` (minmax, entropy or percentile)."""
    if len(images) == 0:
        raise errors.CompileError(
            "int8-static: no calibration images (export.calibration.samples of the "
            "training split); add data or drop int8-static from export.variants"
        )
    if method not in CALIBRATION_METHODS:
        raise errors.CompileError(
            f"int8-static: unknown calibration method {method!r} (use {', '.join(CALIBRATION_METHODS)})"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    ort_quantize_static(
        str(pre),
        str(dst),
        ArrayReader(images, batch_size),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=settings.reduce_range,
        activation_type=settings.activations,
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION_METHODS[method],
        extra_options={
            "ActivationSymmetric": settings.symmetric,
            "WeightSymmetric": True,
            "QuantizeBias": settings.quantize_bias,
        },
    )
    return dst
