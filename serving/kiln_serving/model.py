"""The model: find the ONNX file (card or plain), verify it, open an onnxruntime session, warm up, predict.

Loading never raises: a model that cannot be served stays not-ready with a `reason` the readiness endpoint
and the log show, while the process stays live, so Kubernetes reports the cause instead of a crash loop.
"""

import abc
import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kiln import api
from kiln.api import constants
from kiln_serving import codec, errors, providers
from kiln_serving.config import ServingConfig

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
VERSION = "1"


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output: OIP datatype and shape with -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class Model(abc.ABC):
    """What the data plane needs from a model; OnnxModel is the real one, benchmarks add others."""

    name: str
    version: str = VERSION
    platform: str = PLATFORM
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    card: api.ModelCard | None = None
    ready: bool = False
    reason: str | None = "loading"
    provider: str = providers.CPU
    load_seconds: float = 0.0
    parameters: dict[str, object] = field(default_factory=dict)

    @abc.abstractmethod
    def load(self) -> None:
        """Load and warm up (blocking); sets ready, or reason when it cannot serve."""

    @abc.abstractmethod
    def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
        """Run one (possibly merged) batch; called by the batcher one batch at a time, from its worker thread (or,
        for a short full batch, the event loop's: batching.INLINE_SECONDS)."""

    @property
    def batchable(self) -> bool:
        """Whether requests may be merged: every input and output has a dynamic first dimension."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


@dataclass(frozen=True)
class Located:
    """The ONNX file to load and what the card says about it."""

    path: Path
    name: str
    card: api.ModelCard | None = None
    variant: api.VariantReport | None = None
    # The file the card's sha256 is for (the variant's path, also when the optimised graph is served).
    verify: Path | None = None
    # That sha256 when it is not the variant's own (the TensorRT graph's).
    sha256: str | None = None


def for_tensorrt(located: Located, root: Path) -> Located:
    """What to serve when TensorRT leads: the variant's TensorRT graph (symmetric int8) where the card has one."""
    variant = located.variant
    if variant is None or variant.tensorrt_path is None:
        return located
    graph = root / variant.tensorrt_path
    return dataclasses.replace(located, path=graph, verify=graph, sha256=variant.tensorrt_sha256)


def locate(config: ServingConfig) -> Located:
    """Resolve --model-dir/--variant/--use-optimized to a file; ValueError says what is missing."""
    root = config.model_dir
    if root.is_file():  # a bare .onnx path is accepted too
        return Located(path=root, name=config.model_name or root.stem)
    if not root.is_dir():
        raise ValueError(f"model directory {root} does not exist")
    card_file = root / constants.MODEL_CARD_FILE
    if not card_file.is_file():
        if config.variant is not None:
            raise ValueError(f"--variant {config.variant} needs a {constants.MODEL_CARD_FILE} in {root}")
        plain = root / constants.MODEL_FILE
        found = [plain] if plain.is_file() else sorted(root.glob("*.onnx"))
        if len(found) != 1:
            raise ValueError(
                f"{root} has no {constants.MODEL_CARD_FILE} and no single ONNX file to serve "
                f"(found {len(found)}: {', '.join(p.name for p in found) or 'none'})"
            )
        return Located(path=found[0], name=config.model_name or root.resolve().name)
    try:
        card = api.ModelCard.read(card_file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{card_file}: invalid model card: {err}") from None
    variant = card.variant(config.variant or card.selected)
    if variant.rejected:
        log.warning("serving variant %s although the trainer rejected it: %s", variant.name, variant.reason)
    path = root / variant.path
    if config.use_optimized and variant.optimized_path:
        serve_path = root / variant.optimized_path
    else:
        if config.use_optimized:
            log.info("variant %s has no optimized_path; serving %s", variant.name, variant.path)
        serve_path = path
    return Located(path=serve_path, name=config.model_name or card.name, card=card, variant=variant, verify=path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dims(shape: object) -> tuple[int, ...]:
    """onnxruntime's shape (ints, None or symbolic names) -> OIP dims with -1 for anything not fixed."""
    if not isinstance(shape, list | tuple):
        return ()
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxModel(Model):
    """An onnxruntime InferenceSession behind the Model interface."""

    def __init__(self, config: ServingConfig) -> None:
        name = config.model_name or config.model_dir.resolve().stem
        super().__init__(name=name)
        self.config = config
        self.located: Located | None = None
        try:
            self.located = locate(config)
            self.name, self.card = self.located.name, self.located.card
        except (ValueError, KeyError) as err:
            self.reason = str(err).strip("\"'")
        self._session: ort.InferenceSession | None = None
        self._output_names: list[str] = []

    def load(self) -> None:
        if self.located is None:
            log.error("model %s cannot be served: %s", self.name, self.reason)
            return
        started = time.perf_counter()
        try:
            self._load(self.located)
        except _Refused as err:
            self.reason = str(err)
        except Exception as err:  # any failure leaves the server live and explains itself on /ready
            self.reason = f"failed to load {self.located.path}: {err}"
        else:
            self.load_seconds = time.perf_counter() - started
            self.ready, self.reason = True, None
            log.info(
                "model %s ready in %.2fs on %s (%s, batching %s)",
                self.name,
                self.load_seconds,
                self.provider,
                self.located.path,
                "on" if self.batchable and self.config.batching else "off",
            )
            return
        self.ready = False
        log.error("model %s is not ready: %s", self.name, self.reason)

    def _load(self, located: Located) -> None:
        plan = self._plan(located.path, ort.get_available_providers())
        if plan.names()[0] == providers.TENSORRT:  # TensorRT takes only symmetric int8 and needs fp16 enabled
            located = for_tensorrt(located, self.config.model_dir)
            variant = located.variant.name if located.variant is not None else None
            plan = providers.with_tensorrt_options(
                plan, providers.tensorrt_precision(variant, symmetric_int8=located.sha256 is not None)
            )

        # 1. Refuse a corrupted or swapped file before onnxruntime parses it.
        if located.variant is not None and located.verify is not None:
            actual, expected = sha256_of(located.verify), located.sha256 or located.variant.sha256
            if actual != expected:
                raise _Refused(
                    f"sha256 mismatch for {located.verify}: model card says {expected}, "
                    f"file has {actual}; refusing to serve a corrupted or replaced model"
                )
            if located.path != located.verify:
                log.info("serving %s; its sha256 is not in the card (verified %s)", located.path, located.verify)

        # 2. Session: full graph optimisation, one op at a time, threads = the container's CPU quota.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.config.threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op threads spin by default, burning the CPU quota the event loop needs for HTTP work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.ort_spinning else "0")
        providers.preload_gpu_libraries(plan)
        session = ort.InferenceSession(str(located.path), sess_options=options, providers=plan.providers)
        providers.guard(session, plan)

        # 3. The provider the session really runs on, not the one asked for.
        self._check_providers(plan, session)

        self.inputs = [
            TensorInfo(i.name, codec.ONNX_DATATYPES.get(i.type, i.type), _dims(i.shape)) for i in session.get_inputs()
        ]
        self.outputs = [
            TensorInfo(o.name, codec.ONNX_DATATYPES.get(o.type, o.type), _dims(o.shape)) for o in session.get_outputs()
        ]
        self._output_names = [o.name for o in self.outputs]
        self._session = session
        self.parameters = {
            "provider": self.provider,
            "providers": list(session.get_providers()),
            "intra_op_threads": options.intra_op_num_threads,
            "max_batch_size": self.config.max_batch_size if self.batchable and self.config.batching else 1,
            "file": located.path.name,
        }
        if located.variant is not None:
            self.parameters.update(variant=located.variant.name, sha256=located.variant.sha256)

        # 4. Warm up (allocations, kernels, TensorRT engines) before saying ready, then check the providers again:
        #    a provider that failed during warm-up may have been swapped for the CPU.
        self._warm_up()
        self._check_providers(plan, session)
        self.parameters.update(provider=self.provider, providers=list(session.get_providers()))

    def _check_providers(self, plan: providers.Plan, session: ort.InferenceSession) -> None:
        """Record the provider the session runs on; refuse when the plan forbids where it ended up."""
        active = session.get_providers()
        self.provider = active[0] if active else providers.CPU
        problem = providers.check(plan, active)
        if problem is not None:
            raise _Refused(problem)
        if plan.accelerators and self.provider != plan.accelerators[0]:
            log.warning("model %s runs on %s although %s was asked for first (its libraries missing?)",
                        self.name, self.provider, plan.accelerators[0])  # fmt: skip

    def _plan(self, path: Path, available: list[str]) -> providers.Plan:
        profile: dict[str, str] = {}
        if providers.TENSORRT in available and (
            self.config.providers is None or providers.TENSORRT in self.config.providers
        ):
            profile = providers.tensorrt_profile(self._input_shapes(path), self.config.max_batch_size)
        plan = providers.plan(
            self.config.providers, available, self.config.allow_cpu_fallback, self.config.trt_cache_dir, profile
        )
        if plan.dropped:
            log.warning("providers not available in this onnxruntime build: %s", ", ".join(plan.dropped))
        return plan

    def _input_shapes(self, path: Path) -> list[tuple[str, tuple[int, ...]]]:
        """Input shapes known before a session exists (TensorRT's profile is a session option): the card's,
        else the graph's when the onnx package is installed."""
        if self.card is not None:
            return [(self.card.input.name, tuple(self.card.input.shape))]
        try:
            import onnx
        except ImportError:
            return []
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        return [
            (v.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim))
            for v in graph.input
            if v.name not in initializers
        ]

    def _warm_up(self) -> None:
        """Run batch 1, and the largest batch when batching, on zeros ("0" for text). Best-effort when the
        right values cannot be known: symbolic inner dimensions, or text inputs (a model may want words, JSON
        or numbers in them); then a rejected warm-up is logged and skipped, and the model is ready anyway."""
        batches = [1]
        if self.batchable and self.config.batching:
            batches.append(self.config.max_batch_size)
        guessed = any(d < 0 for t in self.inputs for d in t.shape[1:])
        text = any(t.datatype == "BYTES" for t in self.inputs)
        for batch in batches:
            feed = {}
            for t in self.inputs:
                shape = tuple(batch if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(t.shape))
                dtype = codec.NUMPY_DTYPES.get(t.datatype, np.dtype("<f4"))
                feed[t.name] = np.full(shape, "0", dtype=object) if t.datatype == "BYTES" else np.zeros(shape, dtype)
            try:
                self.predict(feed)
            except Exception as err:
                if not (guessed or text):
                    raise
                log.warning(
                    "warm-up skipped: the model has %s and rejected %s (%s)",
                    "text inputs" if text else "dynamic inner dimensions",
                    {k: v.shape for k, v in feed.items()},
                    err,
                )
                return

    def predict(self, inputs: Mapping[str, codec.Array]) -> dict[str, codec.Array]:
        if self._session is None:
            raise RuntimeError("predict() before load()")
        try:
            results = self._session.run(self._output_names, dict(inputs))
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as err:
            # Shapes the graph cannot take although the declared ones allow them: the client's to fix.
            raise errors.InvalidInput(f"the model rejected the input: {err}") from None
        return dict(zip(self._output_names, results, strict=True))


class _Refused(Exception):
    """Loading stopped on purpose; the message is already the reason."""
