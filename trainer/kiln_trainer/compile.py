"""The compile step: the best checkpoint's model → ONNX variants, each proven faithful and measured, one
selected for serving, everything recorded in the model card.

Everything is built in a staging folder inside the output folder; ``models/`` and ``model-card.json`` are
moved into place only at the end, and the old card is removed first, so a failed or killed compile never
leaves a folder that looks compiled.
"""

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kiln import api
from kiln.api import constants
from kiln_trainer import errors, export, measure, quantize

log = logging.getLogger(__name__)

STAGING_PREFIX = ".compile-"
# Images run through both PyTorch and onnxruntime for the fp32 parity gate.
PARITY_SAMPLES = 256
# Order of preference between variants that measure equally fast: the more exact one first.
_PREFERENCE: dict[str, int] = {name: i for i, name in enumerate(api.VARIANTS)}


@dataclass
class CompileInputs:
    """What the trainer hands over after training (rank 0, everything on the CPU)."""

    model: torch.nn.Module  # the best model, on CPU, eval mode
    val_images: np.ndarray  # float32 NCHW, normalised: the whole validation split
    val_labels: np.ndarray  # int64
    calibration_images: np.ndarray  # float32 NCHW from the training split, no augmentation
    class_names: list[str]
    preprocessing: api.Preprocessing
    training: api.TrainingSummary
    metrics: api.Metrics
    per_class: list[api.ClassMetrics] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    test_images: np.ndarray | None = None  # the held-out test set, when there is one: each variant is scored
    test_labels: np.ndarray | None = None
    test_metrics: api.HeldOutMetrics | None = None
    adversarial: api.AdversarialReport | None = None
    history: list[api.EpochHistory] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # relative to the output folder


def _check_inputs(spec: api.TrainingJobSpec, inputs: CompileInputs) -> None:
    """Refuse inputs that cannot give a meaningful compile before anything is written."""
    pre = inputs.preprocessing
    expected = (pre.channels, pre.image_size, pre.image_size)
    images = inputs.val_images
    if images.ndim != 4 or len(images) == 0:
        raise errors.CompileError(
            f"compile: need validation images as a non-empty NCHW array, got shape {images.shape}"
        )
    if tuple(images.shape[1:]) != expected:
        raise errors.CompileError(
            f"compile: validation images are {tuple(images.shape[1:])}, the preprocessing says {expected}"
        )
    if len(inputs.val_labels) != len(images):
        raise errors.CompileError(f"compile: {len(images)} validation images but {len(inputs.val_labels)} labels")
    if "int8-static" in spec.export.variants:
        calibration = inputs.calibration_images
        if calibration.ndim != 4 or len(calibration) == 0:
            raise errors.CompileError(
                "compile: int8-static needs calibration images from the training split and "
                "got none; add data or drop int8-static from export.variants"
            )
        if tuple(calibration.shape[1:]) != expected:
            raise errors.CompileError(
                f"compile: calibration images are {tuple(calibration.shape[1:])}, the preprocessing says {expected}"
            )


def _torch_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """PyTorch eager logits, the reference the fp32 export must match."""
    model.eval()
    with torch.inference_mode():
        chunks = [
            model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).float().numpy()
            for i in range(0, len(images), batch_size)
        ]
    return np.concatenate(chunks)


def _build_variant(
    variant: str,
    fp32: Path,
    work: Path,
    dst: Path,
    spec: api.TrainingJobSpec,
    inputs: CompileInputs,
    settings: quantize.Int8Settings,
) -> str:
    """Write one non-fp32 variant to ``dst``; returns a note on how it was made (stored in the model)."""
    if variant == "fp16":
        quantize.convert_fp16(fp32, dst)
        return "float16 weights and activations, float32 inputs and outputs"
    pre = work / "model.pre.onnx"
    if not pre.exists():
        quantize.preprocess(fp32, pre)
    if variant == "int8-dynamic":
        quantize.quantize_int8_dynamic(pre, dst, settings)
        return f"dynamic {settings.note}"
    calibration = spec.export.calibration
    images = inputs.calibration_images[: calibration.samples]
    quantize.quantize_int8_static(pre, dst, images, method=calibration.method, settings=settings)
    return f"static QDQ {settings.note}, per-channel weights, {calibration.method} calibration on {len(images)} images"


def _build_tensorrt_int8(
    work: Path, cpu_graph: Path, spec: api.TrainingJobSpec, inputs: CompileInputs, metadata: dict[str, str],
    staging: Path,
) -> str:  # fmt: skip
    """int8-static again, quantized the way TensorRT takes it (symmetric S8S8), beside the CPU graph; the server
    loads it instead when its provider is TensorRT. Returns its path relative to ``staging``."""
    dst = cpu_graph.with_name(constants.TENSORRT_MODEL_FILE)
    calibration = spec.export.calibration
    images = inputs.calibration_images[: calibration.samples]
    settings = quantize.TENSORRT_INT8
    quantize.quantize_int8_static(work / "model.pre.onnx", dst, images, method=calibration.method, settings=settings)
    note = f"static QDQ {settings.note}, per-channel weights, {calibration.method} calibration on {len(images)} images"
    export.stamp_metadata(dst, {**metadata, export.META_VARIANT: "int8-static", "kiln_quantization": note})
    log.info("compile: wrote %s for TensorRT", dst)
    return dst.relative_to(staging).as_posix()


def _measure(
    variant: str,
    path: Path,
    output_dir: Path,
    inputs: CompileInputs,
    reference: np.ndarray | None,
    *,
    provider: str,
    threads: int | None,
    repeats: int,
) -> tuple[api.VariantReport, np.ndarray]:
    """Accuracy, agreement with ``reference`` (fp32 logits, if given), latency at batch 1 and 32, size; the sha256 is
    filled in once every file is final."""
    session = measure.open_session(path, provider=provider, threads=threads)
    logits = measure.predict(session, inputs.val_images)
    report = api.VariantReport(
        name=variant,
        path=path.relative_to(output_dir).as_posix(),
        sha256="",
        size_bytes=path.stat().st_size,
        accuracy=measure.accuracy(logits, inputs.val_labels),
        provider=provider,
    )
    if inputs.test_images is not None and inputs.test_labels is not None and len(inputs.test_labels):
        report.test_accuracy = measure.accuracy(measure.predict(session, inputs.test_images), inputs.test_labels)
    if reference is not None:
        comparison = measure.compare_logits(reference, logits)
        report.max_abs_diff, report.top1_agreement = comparison.max_abs_diff, comparison.top1_agreement
    log.info("compile: %s accuracy %.4f, %.1f MB", variant, report.accuracy, report.size_bytes / 1e6)
    return report, logits


def _time_variants(
    reports: list[api.VariantReport],
    staging: Path,
    inputs: CompileInputs,
    *,
    provider: str,
    threads: int,
    repeats: int,
) -> None:
    """Latency at batch 1 and 32 of every variant, measured together: the same fixed thread count for all,
    repeats interleaved across variants, so a load spike on the compiling machine slows every candidate alike
    and the comparison within this run stays fair."""
    sessions = {r.name: measure.open_session(staging / r.path, provider=provider, threads=threads) for r in reports}
    for size in (1, 32):
        medians = measure.interleaved_latency_ms(
            sessions, measure.fixed_batch(inputs.val_images, size), repeats=repeats
        )
        for report in reports:
            if size == 1:
                report.latency_ms_batch1 = medians[report.name]
            else:
                report.latency_ms_batch32 = medians[report.name]
    for report in reports:
        log.info(
            "compile: %s %.2f ms at batch 1, %.2f ms at batch 32 (%d threads, interleaved)",
            report.name,
            report.latency_ms_batch1,
            report.latency_ms_batch32,
            threads,
        )


def reject_inaccurate(reports: list[api.VariantReport], max_drop: float) -> None:
    """Mark every variant whose accuracy is more than ``max_drop`` below fp32's as rejected (kept on disk)."""
    baseline = next(r for r in reports if r.name == "fp32").accuracy or 0.0
    for report in reports:
        drop = baseline - (report.accuracy or 0.0)
        if report.name != "fp32" and (drop > max_drop + 1e-9 or report.accuracy is None):
            report.rejected = True
            report.reason = (
                f"accuracy {report.accuracy or 0.0:.4f} is {drop:.4f} below fp32's {baseline:.4f}, "
                f"more than export.maxAccuracyDrop {max_drop:g}"
            )


def select_variant(reports: list[api.VariantReport], requested: str, *, serve_on_gpu: bool) -> tuple[str, str]:
    """The variant to serve and why: ``serving.variant`` when set; on a GPU fp16 when accepted; on a CPU the
    fastest accepted variant at batch 32, which is never slower than fp32 because fp32 is a candidate."""
    by_name = {r.name: r for r in reports}
    if requested != "auto":
        if requested not in by_name:
            raise errors.CompileError(f"serving.variant {requested!r} was not built (built: {', '.join(by_name)})")
        chosen = by_name[requested]
        note = f", although it is rejected: {chosen.reason}" if chosen.rejected else ""
        return requested, f"serving.variant asks for {requested}{note}"
    if serve_on_gpu:
        fp16, fp32 = by_name.get("fp16"), by_name["fp32"]
        if fp16 is None or fp16.rejected:
            why = "rejected" if fp16 is not None else "not in export.variants"
            return "fp32", f"auto on a GPU: fp16 is {why}, so fp32"
        fast, slow = (fp16.latency_ms_batch32 or 0.0), (fp32.latency_ms_batch32 or 0.0)
        timing = f"{fast:.2f} ms vs {slow:.2f} ms for fp32 at batch 32 on {fp16.provider}"
        if fast < slow:  # timed, not assumed: fp16 is slower than fp32 on some GPUs and models
            return (
                "fp16",
                f"auto on a GPU: fp16 measured faster, {timing}; accuracy {fp16.accuracy:.4f} vs {fp32.accuracy:.4f}",
            )
        return "fp32", f"auto on a GPU: fp16 is not faster, {timing}"
    candidates = [r for r in reports if not r.rejected and r.name != "fp16" and r.latency_ms_batch32 is not None]
    fastest = min(candidates, key=lambda r: (r.latency_ms_batch32 or 0.0, _PREFERENCE.get(r.name, 99)))
    fp32 = by_name["fp32"]
    assert fastest.latency_ms_batch32 is not None and fp32.latency_ms_batch32 is not None
    skipped = [f"{r.name} rejected" for r in reports if r.rejected]
    if "fp16" in by_name:
        skipped.append("fp16 is for GPU serving")
    tail = f" ({'; '.join(skipped)})" if skipped else ""
    if fastest.name == "fp32":
        return "fp32", f"auto: no accepted variant is faster than fp32 at batch 32 on {fp32.provider}{tail}"
    speedup = fp32.latency_ms_batch32 / max(fastest.latency_ms_batch32, 1e-9)
    return fastest.name, (
        f"auto: fastest accepted variant at batch 32 on {fastest.provider}: {fastest.latency_ms_batch32:.2f} ms "
        f"vs {fp32.latency_ms_batch32:.2f} ms for fp32 ({speedup:.1f}x), accuracy {fastest.accuracy:.4f} vs "
        f"{fp32.accuracy:.4f}{tail}"
    )


def _build(
    spec: api.TrainingJobSpec,
    inputs: CompileInputs,
    staging: Path,
    name: str,
    *,
    serve_on_gpu: bool,
    repeats: int,
    threads: int,
) -> api.ModelCard:
    """Export, check, build and measure every variant, select, inside ``staging``."""
    models_dir, work = staging / constants.MODELS_DIR, staging / "work"
    work.mkdir()
    provider = measure.measurement_provider(serve_on_gpu)
    metadata = {
        export.META_CLASS_NAMES: json.dumps(inputs.class_names),
        export.META_PREPROCESSING: json.dumps(inputs.preprocessing.to_dict()),
    }

    # Export fp32 and prove it computes what PyTorch computes.
    fp32_path = models_dir / "fp32" / constants.MODEL_FILE
    exported = export.export_onnx(
        inputs.model,
        inputs.val_images,
        fp32_path,
        opset=export.resolve_opset(spec.export.opset),
        metadata={**metadata, export.META_VARIANT: "fp32"},
    )
    parity_images = inputs.val_images[:PARITY_SAMPLES]
    torch_logits = _torch_logits(inputs.model, parity_images)
    if torch_logits.ndim != 2 or torch_logits.shape[1] != len(inputs.class_names):
        raise errors.CompileError(
            f"compile: the model returns logits of shape {torch_logits.shape[1:]}, "
            f"expected ({len(inputs.class_names)},) for {len(inputs.class_names)} classes"
        )
    cpu_session = measure.open_session(fp32_path, threads=threads)
    parity = measure.compare_logits(
        torch_logits, measure.predict(cpu_session, parity_images), tie_tolerance=measure.PARITY_MAX_ABS_DIFF
    )
    failure = measure.parity_failure(parity)
    if failure is not None:
        raise errors.CompileError(
            f"compile: the fp32 ONNX export does not match PyTorch on {len(parity_images)} "
            f"validation images ({failure}); the model is not exported faithfully"
        )
    log.info(
        "compile: fp32 parity with PyTorch: max abs diff %.2g, top-1 agreement %.2f%%",
        parity.max_abs_diff,
        parity.top1_agreement * 100,
    )
    if provider != measure.CPU:
        try:  # onnxruntime lists CUDA whenever it was built with it, even when the CUDA libraries are missing
            measure.open_session(fp32_path, provider=provider)
        except Exception as err:  # onnxruntime's own error types, or ours when it fell back to the CPU
            log.warning("compile: %s; measuring on the CPU instead", err)
            provider = measure.CPU
    fp32_report, reference = _measure(
        "fp32", fp32_path, staging, inputs, None, provider=provider, threads=threads, repeats=repeats
    )
    fp32_report.max_abs_diff, fp32_report.top1_agreement = parity.max_abs_diff, parity.top1_agreement
    reports = [fp32_report]

    # Reduced-precision variants, each measured against fp32.
    settings = quantize.int8_settings()
    for variant in (v for v in api.VARIANTS if v != "fp32" and v in spec.export.variants):
        path = models_dir / variant / constants.MODEL_FILE
        try:
            note = _build_variant(variant, fp32_path, work, path, spec, inputs, settings)
        except errors.CompileError:
            raise
        except Exception as err:  # the converters raise whatever their graph passes hit
            raise errors.CompileError(
                f"compile: building {variant} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); drop it from "
                "export.variants to compile the others"
            ) from err
        export.stamp_metadata(path, {**metadata, export.META_VARIANT: variant, "kiln_quantization": note})
        measured, _ = _measure(
            variant, path, staging, inputs, reference, provider=provider, threads=threads, repeats=repeats
        )
        if variant == "int8-static" and serve_on_gpu:
            measured.tensorrt_path = _build_tensorrt_int8(work, path, spec, inputs, metadata, staging)
        reports.append(measured)
    reject_inaccurate(reports, spec.export.max_accuracy_drop)
    _time_variants(reports, staging, inputs, provider=provider, threads=threads, repeats=repeats)

    # Select, save the selected variant's offline-optimised graph, then checksum the final files.
    selected, reason = select_variant(reports, spec.serving.variant, serve_on_gpu=serve_on_gpu)
    log.info("compile: selected %s: %s", selected, reason)
    chosen = next(r for r in reports if r.name == selected)
    optimized = models_dir / selected / constants.OPTIMIZED_MODEL_FILE
    # On the CPU whatever the serving provider: a graph optimised under CUDA holds Memcpy nodes the CPU cannot run.
    measure.save_optimized(staging / chosen.path, optimized, provider=measure.CPU)
    chosen.optimized_path = optimized.relative_to(staging).as_posix()
    for report in reports:
        report.sha256 = api.file_sha256(staging / report.path)
        report.size_bytes = (staging / report.path).stat().st_size
        if report.tensorrt_path is not None:
            report.tensorrt_sha256 = api.file_sha256(staging / report.tensorrt_path)
    pre = inputs.preprocessing
    return api.ModelCard(
        name=name,
        created_at=api.now_rfc3339(),
        input=api.TensorSpec(name=export.INPUT_NAME, shape=[-1, pre.channels, pre.image_size, pre.image_size]),
        output=api.TensorSpec(name=export.OUTPUT_NAME, shape=[-1, len(inputs.class_names)]),
        class_names=inputs.class_names,
        preprocessing=pre,
        metrics=inputs.metrics,
        per_class=inputs.per_class,
        confusion_matrix=inputs.confusion_matrix,
        training=inputs.training,
        test_metrics=inputs.test_metrics,
        adversarial=inputs.adversarial,
        history=inputs.history,
        plots=inputs.plots,
        opset=exported.opset,
        exporter=exported.exporter,
        variants=reports,
        selected=selected,
        selection_reason=reason,
    )


def _publish(staging: Path, output_dir: Path, card: api.ModelCard) -> None:
    """Swap the new models in and write the card last; the old card goes first, so no moment shows a card
    next to models it does not describe."""
    card_path = output_dir / constants.MODEL_CARD_FILE
    card_path.unlink(missing_ok=True)
    models = output_dir / constants.MODELS_DIR
    if models.exists():
        models.rename(staging / "previous-models")  # removed with the staging folder
    (staging / constants.MODELS_DIR).rename(models)
    card.write(card_path)


def compile_model(
    spec: api.TrainingJobSpec,
    inputs: CompileInputs,
    output_dir: Path,
    name: str,
    *,
    serve_on_gpu: bool = False,
    repeats: int = 10,
    threads: int | None = None,
) -> api.ModelCard:
    """Compile ``inputs.model`` into ``output_dir/models/<variant>/model.onnx`` and write
    ``output_dir/model-card.json``; raises CompileError with nothing new left in ``output_dir``.

    ``repeats`` timed runs per latency figure; ``threads`` fixes onnxruntime's intra-op threads (None:
    measure.selection_threads(), the same on a busy and an idle machine).
    """
    _check_inputs(spec, inputs)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(STAGING_PREFIX + "*"):  # left by a killed compile
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    try:
        fixed = threads if threads is not None else measure.selection_threads()
        card = _build(spec, inputs, staging, name, serve_on_gpu=serve_on_gpu, repeats=repeats, threads=fixed)
        _publish(staging, output_dir, card)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("compile: wrote %s (selected %s)", output_dir / constants.MODEL_CARD_FILE, card.selected)
    return card
