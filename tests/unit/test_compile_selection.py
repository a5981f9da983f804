"""Choosing what to serve, rejecting inaccurate variants, comparing logits, and quantization settings: the
pure decisions of the compile step, on plain values."""

from pathlib import Path

import numpy as np
import pytest

from kiln import api
from kiln_trainer import compile as compiler
from kiln_trainer import errors, measure, quantize


def _report(name: str, batch32: float, accuracy: float = 0.95, rejected: bool = False) -> api.VariantReport:
    return api.VariantReport(
        name=name,
        path=f"models/{name}/model.onnx",
        sha256="0" * 64,
        size_bytes=1,
        accuracy=accuracy,
        latency_ms_batch1=1.0,
        latency_ms_batch32=batch32,
        rejected=rejected,
        reason="accuracy too low" if rejected else None,
    )


def test_auto_on_a_cpu_picks_the_fastest_accepted_variant_and_says_why() -> None:
    reports = [_report("fp32", 40.0), _report("int8-dynamic", 90.0), _report("int8-static", 12.0)]
    name, reason = compiler.select_variant(reports, "auto", serve_on_gpu=False)
    assert name == "int8-static"
    assert "12.00 ms vs 40.00 ms for fp32" in reason and "3.3x" in reason


def test_auto_never_picks_a_variant_slower_than_fp32() -> None:
    reports = [_report("fp32", 10.0), _report("int8-dynamic", 90.0), _report("int8-static", 11.0)]
    name, reason = compiler.select_variant(reports, "auto", serve_on_gpu=False)
    assert name == "fp32"
    assert "no accepted variant is faster than fp32" in reason


def test_auto_prefers_fp32_when_a_quantized_variant_is_exactly_as_fast() -> None:
    reports = [_report("fp32", 10.0), _report("int8-static", 10.0)]
    assert compiler.select_variant(reports, "auto", serve_on_gpu=False)[0] == "fp32"


def test_auto_skips_rejected_variants_however_fast() -> None:
    reports = [_report("fp32", 40.0), _report("int8-static", 5.0, rejected=True), _report("int8-dynamic", 30.0)]
    name, reason = compiler.select_variant(reports, "auto", serve_on_gpu=False)
    assert name == "int8-dynamic"
    assert "int8-static rejected" in reason


def test_auto_on_a_cpu_never_picks_fp16_even_when_it_measured_fastest() -> None:
    reports = [_report("fp32", 40.0), _report("fp16", 5.0)]
    name, reason = compiler.select_variant(reports, "auto", serve_on_gpu=False)
    assert name == "fp32"
    assert "fp16 is for GPU serving" in reason


def test_auto_on_a_gpu_picks_fp16_when_it_measured_faster_and_is_not_rejected() -> None:
    reports = [_report("fp32", 4.0), _report("fp16", 3.0), _report("int8-static", 1.0)]
    assert compiler.select_variant(reports, "auto", serve_on_gpu=True)[0] == "fp16"
    slower = [_report("fp32", 4.0), _report("fp16", 5.0)]
    name, reason = compiler.select_variant(slower, "auto", serve_on_gpu=True)
    assert name == "fp32" and "fp16 is not faster, 5.00 ms vs 4.00 ms" in reason
    reports[1] = _report("fp16", 2.0, rejected=True)
    assert compiler.select_variant(reports, "auto", serve_on_gpu=True) == (
        "fp32",
        "auto on a GPU: fp16 is rejected, so fp32",
    )
    assert compiler.select_variant(reports[:1], "auto", serve_on_gpu=True)[0] == "fp32"


def test_an_explicit_serving_variant_wins_and_a_rejected_one_is_flagged_in_the_reason() -> None:
    reports = [_report("fp32", 10.0), _report("int8-dynamic", 90.0, rejected=True)]
    name, reason = compiler.select_variant(reports, "int8-dynamic", serve_on_gpu=False)
    assert name == "int8-dynamic"
    assert reason == "serving.variant asks for int8-dynamic, although it is rejected: accuracy too low"
    with pytest.raises(errors.CompileError, match="was not built"):
        compiler.select_variant(reports, "fp16", serve_on_gpu=False)


def test_variants_losing_more_than_max_accuracy_drop_are_rejected_with_the_figures() -> None:
    reports = [
        _report("fp32", 1.0, 0.95),
        _report("fp16", 1.0, 0.95),
        _report("int8-dynamic", 1.0, 0.935),
        _report("int8-static", 1.0, 0.92),
    ]
    compiler.reject_inaccurate(reports, 0.02)
    assert [r.rejected for r in reports] == [False, False, False, True]
    assert reports[3].reason == ("accuracy 0.9200 is 0.0300 below fp32's 0.9500, more than export.maxAccuracyDrop 0.02")


def test_compare_logits_counts_top1_agreement_and_the_largest_difference() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.5, 0.4999]], dtype=np.float32)
    candidate = np.array([[0.9, 0.0], [1.0, 0.0], [2.0, 1.0], [0.4999, 0.5]], dtype=np.float32)
    strict = measure.compare_logits(reference, candidate)
    assert strict.top1_agreement == 0.5 and strict.max_abs_diff == pytest.approx(1.0)
    # A near-tie in the reference flipped by less than the tolerance is not a disagreement.
    assert measure.compare_logits(reference, candidate, tie_tolerance=1e-3).top1_agreement == 0.75


def test_parity_fails_on_a_large_difference_or_too_little_agreement_and_names_both() -> None:
    assert measure.parity_failure(measure.Comparison(max_abs_diff=1e-6, top1_agreement=1.0)) is None
    failure = measure.parity_failure(measure.Comparison(max_abs_diff=0.5, top1_agreement=0.99))
    assert failure == "max abs diff 0.5 > 0.001; top-1 agreement 99.00% < 99.9%"
    assert measure.parity_failure(measure.Comparison(max_abs_diff=float("nan"), top1_agreement=1.0))


@pytest.mark.parametrize(
    ("flags", "machine", "reduce_range"),
    [
        ({"avx2", "avx512_vnni"}, "x86_64", False),
        ({"avx2", "avx_vnni"}, "x86_64", False),
        ({"avx2", "avx512f"}, "x86_64", True),
        (set(), "aarch64", False),
    ],
    ids=["avx512-vnni", "avx-vnni", "x86-without-vnni", "arm"],
)
def test_int8_weights_use_reduce_range_only_on_x86_without_vnni(
    flags: set[str], machine: str, reduce_range: bool
) -> None:
    settings = quantize.int8_settings(frozenset(flags), machine)
    assert settings.reduce_range is reduce_range
    assert settings.note.startswith("U8S8")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert quantize.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert quantize.cpu_flags(tmp_path / "missing") == frozenset()


def test_the_calibration_reader_feeds_every_image_once_in_batches() -> None:
    images = np.zeros((35, 3, 4, 4), dtype=np.float32)
    reader = quantize.ArrayReader(images, batch_size=16)
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(batch["input"]))
    assert sizes == [16, 16, 3] and len(reader) == 3
    reader.rewind()
    assert reader.get_next() is not None


def test_variants_are_timed_round_robin_so_a_slow_spell_lands_on_every_candidate() -> None:
    order: list[str] = []
    medians = measure.interleaved_medians(
        {"fp32": lambda: order.append("fp32"), "int8": lambda: order.append("int8")}, repeats=3, warmup=1
    )
    assert order == ["fp32", "int8"] * 4
    assert set(medians) == {"fp32", "int8"} and all(m >= 0 for m in medians.values())


def test_variants_are_timed_on_a_fixed_thread_count_whatever_the_machine_has() -> None:
    assert 1 <= measure.selection_threads() <= measure.SELECTION_MAX_THREADS


def test_the_fp32_parity_gate_scales_with_the_magnitude_of_the_logits() -> None:
    reference = np.array([[300.0, -120.0], [5.0, 1.0]], dtype=np.float32)
    close = measure.compare_logits(reference, reference + np.float32(0.05))
    assert close.reference_scale == 300.0 and measure.parity_failure(close) is None
    small = np.array([[0.3, -0.1]], dtype=np.float32)
    assert "max abs diff 0.05 > 0.001" in (measure.parity_failure(measure.compare_logits(small, small + 0.05)) or "")
