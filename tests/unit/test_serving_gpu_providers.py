"""GPU provider settings the CPU can check: cuDNN's search, TensorRT's precision flags for the graph served,
the TensorRT graph chosen when TensorRT leads, and onnxruntime's own run-time fallback turned off where the
plan forbids the CPU."""

from pathlib import Path

import onnxruntime as ort
import serving_support as support

from kiln import api
from kiln_serving import model, providers

GPU_BUILD = [providers.TENSORRT, providers.CUDA, providers.CPU]


def test_the_cuda_provider_picks_convolutions_by_heuristic_not_by_benchmarking_each_batch_size() -> None:
    plan = providers.plan((providers.CUDA,), GPU_BUILD, allow_cpu_fallback=False)
    name, options = plan.providers[0]  # type: ignore[misc]
    assert name == providers.CUDA
    assert options == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def test_tensorrt_enables_the_precision_of_the_graph_it_serves() -> None:
    assert providers.tensorrt_precision("fp16", symmetric_int8=False) == {"trt_fp16_enable": "True"}
    assert providers.tensorrt_precision("int8-static", symmetric_int8=True) == {
        "trt_int8_enable": "True",
        "trt_fp16_enable": "True",
    }
    assert providers.tensorrt_precision("fp32", symmetric_int8=False) == {}
    plan = providers.plan(None, GPU_BUILD, allow_cpu_fallback=False)
    fp16 = providers.with_tensorrt_options(plan, providers.tensorrt_precision("fp16", symmetric_int8=False))
    assert fp16.providers[0] == (providers.TENSORRT, {"trt_fp16_enable": "True"})
    assert fp16.providers[1:] == plan.providers[1:]


def test_under_tensorrt_the_variants_tensorrt_graph_is_served_and_verified_by_its_own_sha256(tmp_path: Path) -> None:
    variant = api.VariantReport(
        name="int8-static",
        path="models/int8-static/model.onnx",
        sha256="cpu-graph",
        size_bytes=1,
        tensorrt_path="models/int8-static/model.tensorrt.onnx",
        tensorrt_sha256="tensorrt-graph",
    )
    cpu = tmp_path / variant.path
    located = model.Located(path=cpu, name="m", variant=variant, verify=cpu)
    chosen = model.for_tensorrt(located, tmp_path)
    assert chosen.path == chosen.verify == tmp_path / "models/int8-static/model.tensorrt.onnx"
    assert chosen.sha256 == "tensorrt-graph"
    without = model.Located(path=cpu, name="m", variant=variant.model_copy(update={"tensorrt_path": None}))
    assert model.for_tensorrt(without, tmp_path) == without


def test_a_plan_that_forbids_the_cpu_turns_off_onnxruntimes_silent_run_time_fallback(tmp_path: Path) -> None:
    path = support.classifier(tmp_path / "model.onnx")
    strict = providers.Plan(providers=[providers.CPU], accelerators=(providers.CUDA,), cpu_fallback_ok=False)
    lenient = providers.Plan(providers=[providers.CPU], accelerators=(providers.CUDA,), cpu_fallback_ok=True)
    for plan, fallback in ((strict, False), (lenient, True)):
        session = ort.InferenceSession(str(path), providers=plan.providers)
        assert session._enable_fallback  # onnxruntime's default: retry on the CPU after a provider error
        providers.guard(session, plan)
        # The flag InferenceSession.run() reads before switching to the CPU; onnxruntime has no getter.
        assert session._enable_fallback is fallback
