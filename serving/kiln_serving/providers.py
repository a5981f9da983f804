"""Which onnxruntime execution providers to ask for, and whether the session really got them.

onnxruntime-gpu lists CUDA and TensorRT as available even where their libraries are missing; creating a
session then only logs an error and runs everything on CPU. So the plan is checked against
`session.get_providers()` after loading, and that result is what the server reports and gates readiness on.
"""

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Short names accepted by --providers; full onnxruntime names are accepted as well.
ALIASES: dict[str, str] = {
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "cuda": CUDA,
    "gpu": CUDA,
    "cpu": CPU,
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

ProviderEntry = str | tuple[str, dict[str, str]]

# The CUDA provider's options. cuDNN's default EXHAUSTIVE search benchmarks every convolution algorithm for
# each new input shape, and dynamic batching makes a new shape of every merged batch size; the heuristic
# picks at once.
CUDA_OPTIONS: dict[str, str] = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def parse(text: str) -> tuple[str, ...] | None:
    """`tensorrt,cuda,cpu` -> full provider names; `auto` or empty -> None."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == ["auto"]:
        return None
    out = []
    for name in names:
        full = ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"providers: unknown provider {name!r} (use {', '.join(sorted(ALIASES))} or auto)")
        out.append(full)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Plan:
    """Providers to hand to InferenceSession, and what counts as success."""

    providers: list[ProviderEntry]
    # Accelerators the user asked for; empty for CPU-only plans.
    accelerators: tuple[str, ...]
    # Whether running on CPU instead of the accelerators still counts as ready.
    cpu_fallback_ok: bool
    dropped: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.providers]


def plan(
    requested: Sequence[str] | None,
    available: Sequence[str],
    allow_cpu_fallback: bool,
    trt_cache_dir: Path | None = None,
    trt_profile: dict[str, str] | None = None,
) -> Plan:
    """Order the providers: the requested ones that exist (auto: TensorRT, CUDA), then CPU.

    Auto never refuses to serve: it takes the best provider that works and reports which one that was.
    """
    if requested is None:
        wanted = [p for p in (TENSORRT, CUDA) if p in available]
        fallback_ok = True
    else:
        wanted = [p for p in requested if p != CPU]
        fallback_ok = allow_cpu_fallback or not wanted
    present = [p for p in wanted if p in available]
    dropped = [p for p in wanted if p not in available]
    entries: list[ProviderEntry] = []
    for name in present:
        if name == TENSORRT:
            entries.append((name, tensorrt_options(trt_cache_dir, trt_profile or {})))
        elif name == CUDA:
            entries.append((name, dict(CUDA_OPTIONS)))
        else:
            entries.append(name)
    entries.append(CPU)  # always last: onnxruntime places unsupported nodes on it
    return Plan(providers=entries, accelerators=tuple(wanted), cpu_fallback_ok=fallback_ok, dropped=dropped)


def tensorrt_options(cache_dir: Path | None, profile: dict[str, str]) -> dict[str, str]:
    """TensorRT settings: cache built engines (minutes each) and give one shape profile for every batch size."""
    options: dict[str, str] = {}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        options.update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=str(cache_dir),
            trt_timing_cache_enable="True",
            trt_timing_cache_path=str(cache_dir),
        )
    options.update(profile)
    return options


def tensorrt_precision(variant: str | None, symmetric_int8: bool) -> dict[str, str]:
    """TensorRT's precision flags for the graph served: it builds an fp16 graph only with fp16 enabled, and a
    symmetric int8 QDQ graph with int8 enabled (fp16 too, for the layers left unquantized)."""
    if symmetric_int8:
        return {"trt_int8_enable": "True", "trt_fp16_enable": "True"}
    if variant == "fp16":
        return {"trt_fp16_enable": "True"}
    return {}


def with_tensorrt_options(plan: Plan, options: dict[str, str]) -> Plan:
    """The plan with ``options`` added to its TensorRT entry (unchanged when it has none)."""
    entries: list[ProviderEntry] = [
        (p[0], {**p[1], **options}) if not isinstance(p, str) and p[0] == TENSORRT else p for p in plan.providers
    ]
    return dataclasses.replace(plan, providers=entries)


def guard(session: "ort.InferenceSession", plan: Plan) -> None:
    """Turn off onnxruntime's run-time fallback where the plan forbids the CPU: on a provider error inside
    run() (TensorRT builds its engines during warm-up) it would otherwise switch the session to the CPU
    silently, after the provider check has passed; with it off, the error reaches the warm-up."""
    if plan.accelerators and not plan.cpu_fallback_ok:
        session.disable_fallback()


def tensorrt_profile(inputs: Sequence[tuple[str, Sequence[int]]], max_batch_size: int) -> dict[str, str]:
    """min/opt/max shapes covering batch 1..max_batch_size, when only the first dimension is dynamic.

    Without a profile TensorRT rebuilds its engine for each new batch size it sees.
    """
    if not inputs or any(len(s) == 0 or s[0] != -1 or any(d < 0 for d in s[1:]) for _, s in inputs):
        return {}

    def shapes(batch: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in (batch, *shape[1:]))}" for name, shape in inputs)

    return {
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(max_batch_size),
        "trt_profile_max_shapes": shapes(max_batch_size),
    }


def check(plan: Plan, active: Sequence[str]) -> str | None:
    """None when the session runs where it should; otherwise why not, in words an operator can act on."""
    first = active[0] if active else CPU
    if first != CPU or not plan.accelerators or plan.cpu_fallback_ok:
        return None
    return (
        f"requested {', '.join(plan.accelerators)} but the session runs on {first} (are the CUDA/TensorRT "
        "libraries and a GPU present, and is onnxruntime-gpu installed instead of onnxruntime?); "
        "pass --allow-cpu-fallback to serve on CPU anyway"
    )


def preload_gpu_libraries(plan: Plan) -> None:
    """Load CUDA/cuDNN from NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]) before the session needs them."""
    if not any(name in (CUDA, TENSORRT) for name in plan.names()):
        return
    import onnxruntime

    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as err:  # a missing wheel is fine: system libraries may be there instead
        log.info("onnxruntime.preload_dlls() failed (%s); relying on system CUDA libraries", err)
