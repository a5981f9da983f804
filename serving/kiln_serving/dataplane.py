"""The Open Inference Protocol's data plane: one model with its batcher and metrics, its lifecycle, and the
protocol's operations (decode, run through the batcher, encode). Knows the protocol, not HTTP or gRPC:
errors are domain errors that app.py and grpc_service.py turn into statuses.

Heavy work runs off the event loop: a body of LARGE_BYTES or more of JSON (binary tensors weigh less) is
decoded and its answer encoded on the `kiln-codec` threads, and at most config.max_concurrent_large_requests
bodies of LARGE_BYTES are read and decoded at once (`admit`), so health checks stay fast and memory stays
bounded however many large requests arrive.
"""

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from prometheus_client import CollectorRegistry

import kiln
from kiln import api
from kiln_serving import (
    admission,
    batching,
    binary,
    codec,
    errors,
    images,
    jsontext,
    jsonwrite,
    layouts,
    metrics,
    protocol,
)
from kiln_serving.config import ServingConfig
from kiln_serving.model import Model, OnnxModel, TensorInfo

log = logging.getLogger(__name__)

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics"]
# Bodies from this size on are admitted a few at a time, and work of this weight runs on the codec threads.
LARGE_BYTES = 256 * 1024
# A binary tensor's byte weighs this much less than a byte of JSON text: it is only checked (finite values) and
# used in place, ~10x faster than parsing, so a batch of raw tensors is not worth a trip to a codec thread.
_BINARY_WEIGHT = 8


def large(size: int | None) -> bool:
    """Whether a body (or work) of `size` bytes (None: not known yet) is large: admitted a few at a time, and
    handled off the event loop."""
    return size is None or size >= LARGE_BYTES


def weight(text_bytes: int, binary_bytes: int = 0) -> int:
    """How heavy decoding (or encoding) this much JSON text and binary tensor data is, in bytes of JSON."""
    return text_bytes + binary_bytes // _BINARY_WEIGHT


T = TypeVar("T")


@dataclass(frozen=True)
class InferResponse:
    """An encoded inference response; header_length is set when binary tensors follow the JSON."""

    body: bytes
    header_length: int | None


class DataPlane:
    """One model behind the protocol."""

    def __init__(self, config: ServingConfig, model: Model | None, registry: CollectorRegistry | None) -> None:
        self.config = config
        self.model = model if model is not None else OnnxModel(config)
        self.metrics = metrics.ServingMetrics(registry)
        self.model_metrics = self.metrics.for_model(self.model.name, self.model.version)
        self.batcher = batching.Batcher(
            self.model,
            self.model_metrics,
            config.max_batch_size,
            config.max_queue_delay_microseconds / 1e6,
            config.max_queue_size,
        )
        self.loaded = threading.Event()
        self.shutting_down = False
        self._codec = ThreadPoolExecutor(config.max_concurrent_large_requests, thread_name_prefix="kiln-codec")
        self._places = admission.Places(config.max_concurrent_large_requests)
        self.layouts = layouts.Layouts()  # HTTP and gRPC requests' descriptions seen before, checked

    # -- lifecycle ------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: load and warm up (in a thread, so liveness answers at once), then record the outcome."""
        self.model.load()
        self.model_metrics.loaded(self.model.ready, self.model.provider, self.model.load_seconds)
        self.loaded.set()

    def start(self) -> None:
        self.batcher.start()
        threading.Thread(target=self.load, name="kiln-model-load", daemon=True).start()

    async def stop(self) -> None:
        """After the listeners stopped and in-flight requests finished: drain the queue."""
        self.shutting_down = True
        await self.batcher.stop()
        self._codec.shutdown(wait=False, cancel_futures=True)

    # -- heavy work -----------------------------------------------------------------------------------------

    def admit(self, size: int | None, taken: bool = False) -> AbstractAsyncContextManager[None]:
        """One of the large-request places, held while a body of `size` bytes (None: unknown) is handled (`taken`:
        by admit_now already); a small body needs none, and enters nothing that costs (this is every request's
        path)."""
        if not large(size):
            return contextlib.nullcontext()
        return self._places.held(taken)

    def admit_now(self, size: int) -> bool:
        """Whether a body of `size` bytes may be read at once: it is small, or a large-request place was free and
        is now taken, for admit(size, taken=True) to give back."""
        return not large(size) or self._places.take_now()

    async def offload(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """work(*args), on a codec thread when `size` bytes make it heavy, else right here."""
        if not large(size):
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self._codec, functools.partial(work, *args))

    # -- health and metadata -------------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, object]:
        return {"name": SERVER_NAME, "version": kiln.__version__, "extensions": EXTENSIONS}

    def ready(self) -> bool:
        return self.model.ready and not self.shutting_down

    def not_ready_reason(self) -> str:
        if self.shutting_down:
            return "the server is shutting down"
        return self.model.reason or "loading"

    def check_model(self, name: str, version: str | None) -> None:
        """ModelNotFound unless name (and version, if given) is what this server serves; a version that is not a
        number is the client's error (400), as Triton answers it."""
        if name != self.model.name:
            raise errors.ModelNotFound(f"model '{name}' not found; this server serves '{self.model.name}'")
        if version is not None and binary.digits(version) is None:
            raise errors.InvalidInput(f"model version must be a number, got {version!r}")
        if version is not None and version != self.model.version:
            raise errors.ModelNotFound(f"model '{name}' has no version '{version}' (versions: {self.model.version})")

    def require_ready(self, name: str, version: str | None) -> Model:
        self.check_model(name, version)
        if not self.ready():
            raise errors.ModelNotReady(f"model '{name}' is not ready: {self.not_ready_reason()}")
        return self.model

    def model_metadata(self, name: str, version: str | None) -> dict[str, object]:
        model = self.require_ready(name, version)
        return {
            "name": model.name,
            "versions": [model.version],
            "platform": model.platform,
            "inputs": [t.to_dict() for t in model.inputs],
            "outputs": [t.to_dict() for t in model.outputs],
            "parameters": model.parameters,
        }

    def statistics(self, name: str | None, version: str | None) -> dict[str, object]:
        """Triton's statistics extension: all models (here: one) or the one named."""
        if name is not None:
            self.check_model(name, version)
        return {"model_stats": [self.model_metrics.triton_statistics()]}

    # -- inference ------------------------------------------------------------------------------------------

    async def run(self, request: protocol.Request) -> dict[str, codec.Array]:
        """A decoded request through the batcher."""
        return await self.batcher.submit(request.inputs)

    async def infer(
        self, name: str, version: str | None, body: bytes | memoryview, header_length: int | None
    ) -> InferResponse:
        """POST /v2/models/{name}[/versions/{v}]/infer: JSON, the binary extension, or a raw binary tensor."""
        model = self.require_ready(name, version)
        text = len(body) if header_length is None else header_length
        request = await self.offload(weight(text, len(body) - text), self._decode, model, body, header_length)
        outputs = await self.run(request)
        # JSON text is a few times the bytes; binary outputs are only copied.
        size = sum(weight(0, outputs[w.name].nbytes) if w.binary else weight(4 * outputs[w.name].nbytes)
                   for w in request.outputs)  # fmt: skip
        return await self.offload(size, self._encode, model, request, outputs)

    def _decode(self, model: Model, body: bytes | memoryview, header_length: int | None) -> protocol.Request:
        if header_length == 0:
            return protocol.from_raw(model, memoryview(body), self.config.allow_non_finite)
        text = len(body) if header_length is None else header_length
        return jsontext.decoded(text, self._decode_json, model, body, header_length)

    def _decode_json(self, model: Model, body: bytes | memoryview, header_length: int | None) -> protocol.Request:
        key = layouts.header_key(body, header_length)
        binary_part = lambda found: found.split(memoryview(body)[header_length or 0 :])  # noqa: E731
        known = self.layouts.request(key, binary_part, model, self.config.allow_non_finite)
        if known is not None:
            return known
        header, rest = binary.split(body, header_length)
        request = protocol.from_json(model, header, binary.Reader(rest), self.config.allow_non_finite)
        self.layouts.remember(key, layouts.json_layout(header, request))
        return request

    @staticmethod
    def _encode(model: Model, request: protocol.Request, outputs: dict[str, codec.Array]) -> InferResponse:
        """The answer; large string outputs are let go here, a slice at a time, not on the loop."""
        header, chunks = protocol.answer(model, request, outputs)
        codec.release(outputs.values())
        return InferResponse(*binary.join(header, chunks))

    async def predict_v1(self, name: str, body: bytes) -> bytes:
        """KServe v1: {"instances": [...]} -> {"predictions": [...]}; one row per instance."""
        model = self.require_ready(name, None)
        inputs = await self.offload(len(body), jsontext.decoded, len(body), self._decode_v1, model, body)
        outputs = await self.batcher.submit(inputs)
        rows = len(next(iter(inputs.values())))
        names = [t.name for t in model.outputs]
        if not batching.follow_rows(outputs, rows):
            raise errors.InferenceFailed(
                f"model '{model.name}' answered outputs that do not have a row per instance: "
                f"{ {n: list(outputs[n].shape) for n in names} } for {rows} instances"
            )
        return await self.offload(sum(weight(4 * outputs[n].nbytes) for n in names), _predictions, names, outputs)

    def _decode_v1(self, model: Model, body: bytes) -> dict[str, codec.Array]:
        request = jsontext.loads_request(body, jsontext.instances)
        instances = request.get("instances") if isinstance(request, dict) else None
        if isinstance(instances, jsontext.Deferred):
            stacked = _stack_numbers(model, instances)
            if stacked is not None:
                return protocol.complete(model, stacked, self.config.allow_non_finite)
            instances = instances.value()
        if not isinstance(instances, list) or not instances:
            raise errors.InvalidInput('request needs "instances": a non-empty list')
        inputs: dict[str, codec.Array] = {}
        for spec in model.inputs:
            if len(model.inputs) == 1 and not all(isinstance(i, dict) for i in instances):
                rows = instances
            elif all(isinstance(i, dict) and spec.name in i for i in instances):
                rows = [i[spec.name] for i in instances]
            else:
                raise errors.InvalidInput(
                    f"each instance must be an object with input '{spec.name}' "
                    f"(model '{model.name}' takes {protocol.names(model.inputs)})"
                )
            inputs[spec.name] = _stack(spec, rows)
        return protocol.complete(model, inputs, self.config.allow_non_finite)

    async def classify(self, name: str, version: str | None, image: bytes, top_k: str | None) -> dict[str, object]:
        """An image in, the card's preprocessing applied, the top-k classes with softmax probabilities out."""
        model = self.require_ready(name, version)
        card = model.card
        if card is None:
            raise errors.InvalidInput(
                f"classify needs a model card (model-card.json with preprocessing and class names); model "
                f"'{model.name}' was loaded from a plain ONNX file: use /v2/models/{model.name}/infer instead"
            )
        k = 5 if top_k is None else binary.digits(top_k) or 0
        if k < 1:
            raise errors.InvalidInput(f"top_k must be a positive integer, got {top_k!r}")
        by_name = {t.name: t for t in model.inputs}
        spec = by_name.get(card.input.name) or model.inputs[0]
        # Decoding is heavy whatever the byte count: a tiny PNG can hold millions of pixels.
        tensor = await self.offload(LARGE_BYTES, _image_tensor, image, card, codec.NUMPY_DTYPES[spec.datatype])
        codec.check_shape(spec.name, spec.shape, tensor.shape)
        outputs = await self.batcher.submit({spec.name: tensor})
        logits = outputs.get(card.output.name, next(iter(outputs.values())))
        probabilities = images.softmax(logits[0])
        order = np.argsort(probabilities, kind="stable")[::-1][:k]
        names = card.class_names
        return {
            "model_name": model.name,
            "model_version": model.version,
            "predictions": [
                {
                    "label": names[i] if i < len(names) else str(i),
                    "index": int(i),
                    "probability": float(probabilities[i]),
                }
                for i in order
            ],
        }


def _predictions(names: list[str], outputs: Mapping[str, codec.Array]) -> bytes:
    """KServe v1's answer: per row, the output's row (a model of one output) or an object of the outputs' rows,
    written a slice of rows at a time (a million rows made a million lists on the event loop)."""
    per_row = max(outputs[n][:1].size for n in names) or 1

    def rows(start: int, stop: int) -> object:
        values: dict[str, Any] = {n: codec.rows_json(outputs[n], start, stop) for n in names}
        if len(names) == 1:
            return values[names[0]]
        return [{n: values[n][i] for n in names} for i in range(stop - start)]

    count = len(outputs[names[0]])
    return jsonwrite.dumps({"predictions": jsonwrite.dumps_sliced(count, max(1, codec.SLICE_VALUES // per_row), rows)})


def _image_tensor(image: bytes, card: api.ModelCard, dtype: np.dtype[np.generic]) -> codec.Array:
    return images.to_tensor(images.decode(image), card.preprocessing, dtype)


def _stack_numbers(model: Model, instances: jsontext.Deferred) -> dict[str, codec.Array] | None:
    """Numeric instances parsed straight into numpy (jsontext's fast path) for a model of one input whose
    dimensions past the first are fixed: its shape decides how the numbers nest, as for v2's JSON data. None
    where that does not hold (the instances are then parsed as they nest)."""
    spec = model.inputs[0]
    row = spec.shape[1:]
    if len(model.inputs) != 1 or not spec.shape or any(d < 0 for d in row) or spec.datatype not in codec.NUMPY_DTYPES:
        return None
    with codec.in_range(spec.name, spec.datatype):
        flat = instances.to_numpy(codec.NUMPY_DTYPES[spec.datatype])
    size = math.prod(row)
    if flat is None or not size or flat.size % size:
        return None
    array = flat.reshape(-1, *row)
    codec.check_shape(spec.name, spec.shape, array.shape)
    return {spec.name: array}


def _stack(spec: TensorInfo, rows: list[object]) -> codec.Array:
    """KServe v1 instances of one input, stacked along a new first dimension and checked like v2 tensors (values
    as v2's JSON data: of the datatype, no silent casts)."""
    if spec.datatype not in codec.NUMPY_DTYPES:
        raise errors.InvalidInput(f"input '{spec.name}': datatype {spec.datatype} is not supported by this server")
    with codec.in_range(spec.name, spec.datatype):
        flat = codec.json_values(spec.name, spec.datatype, rows)
    shape = (len(rows), *codec.nested_shape(rows[0]))
    if flat.size != math.prod(shape):
        raise errors.InvalidInput(f"input '{spec.name}': instances are not {spec.datatype} arrays of one shape")
    array = flat.reshape(shape)
    codec.check_shape(spec.name, spec.shape, array.shape)
    return array
