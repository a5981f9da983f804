"""The Open Inference Protocol's data plane: decode and validate requests, run them through the batcher,
encode responses. Knows the protocol, not HTTP: errors are domain errors that app.py turns into statuses."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import kiln
from kiln_serving import batching, binary, codec, errors, images
from kiln_serving.model import Model, TensorInfo

SERVER_NAME = "kiln"
EXTENSIONS = ["binary_tensor_data"]


@dataclass(frozen=True)
class InferResponse:
    """An encoded inference response; header_length is set when binary tensors follow the JSON."""

    body: bytes
    header_length: int | None


class DataPlane:
    """One model behind the protocol."""

    def __init__(self, model: Model, batcher: batching.Batcher) -> None:
        self.model = model
        self.batcher = batcher
        self.shutting_down = False

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
        """ModelNotFound unless name (and version, if given) is what this server serves."""
        if name != self.model.name:
            raise errors.ModelNotFound(f"model '{name}' not found; this server serves '{self.model.name}'")
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

    # -- inference ------------------------------------------------------------------------------------------

    async def infer(
        self, name: str, version: str | None, body: bytes | memoryview, header_length: str | None
    ) -> InferResponse:
        """POST /v2/models/{name}[/versions/{v}]/infer, JSON or with the binary extension."""
        model = self.require_ready(name, version)
        header, rest = binary.split(body, header_length)
        inputs = self._decode_inputs(model, header, binary.Reader(rest))
        wanted = self._requested_outputs(model, header)
        outputs = await self.batcher.submit(inputs)

        response: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
        if "id" in header:
            response["id"] = header["id"]
        encoded, chunks = [], []
        for out_name, as_binary in wanted:
            array = outputs[out_name]
            entry: dict[str, Any] = {"name": out_name, "datatype": codec.datatype_of(array), "shape": list(array.shape)}
            if as_binary:
                raw = codec.to_bytes(array)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = codec.to_json(array)
            encoded.append(entry)
        response["outputs"] = encoded
        body_out, length = binary.join(response, chunks)
        return InferResponse(body_out, length)

    def _decode_inputs(self, model: Model, header: Mapping[str, Any], reader: binary.Reader) -> dict[str, codec.Array]:
        raw_inputs = header.get("inputs")
        if not isinstance(raw_inputs, list) or not raw_inputs:
            raise errors.InvalidInput("request needs 'inputs': a non-empty list of tensors")
        expected = {t.name: t for t in model.inputs}
        tensors: dict[str, codec.Array] = {}
        for raw in raw_inputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise errors.InvalidInput("each input must be an object with a 'name'")
            in_name = raw["name"]
            spec = expected.get(in_name)
            if spec is None:
                raise errors.InvalidInput(
                    f"unknown input '{in_name}'; model '{model.name}' takes {_names(model.inputs)}"
                )
            if in_name in tensors:
                raise errors.InvalidInput(f"input '{in_name}' is given twice")
            datatype = raw.get("datatype")
            if datatype != spec.datatype:
                raise errors.InvalidInput(f"input '{in_name}': expected datatype {spec.datatype}, got {datatype}")
            if datatype not in codec.NUMPY_DTYPES:
                raise errors.InvalidInput(f"input '{in_name}': datatype {datatype} is not supported by this server")
            shape = codec.parse_shape(in_name, raw.get("shape"))
            codec.check_shape(in_name, spec.shape, shape)
            parameters = raw.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise errors.InvalidInput(f"input '{in_name}': 'parameters' must be an object")
            if "binary_data_size" in parameters:
                chunk = reader.take(in_name, parameters["binary_data_size"])
                tensors[in_name] = codec.from_bytes(in_name, datatype, shape, chunk)
            elif "data" in raw:
                tensors[in_name] = codec.from_json(in_name, datatype, shape, raw["data"])
            else:
                raise errors.InvalidInput(f"input '{in_name}' has neither 'data' nor parameters.binary_data_size")
        reader.finish()
        missing = [n for n in expected if n not in tensors]
        if missing:
            raise errors.InvalidInput(f"missing input{'s' if len(missing) > 1 else ''} {_names(missing)}")
        return tensors

    def _requested_outputs(self, model: Model, header: Mapping[str, Any]) -> list[tuple[str, bool]]:
        """(output name, as binary) in the order asked for; all outputs when none are listed."""
        parameters = header.get("parameters") or {}
        binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
        raw_outputs = header.get("outputs")
        if raw_outputs is None:
            return [(t.name, binary_default) for t in model.outputs]
        if not isinstance(raw_outputs, list):
            raise errors.InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
        known = {t.name for t in model.outputs}
        wanted = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise errors.InvalidInput("each requested output must be an object with a 'name'")
            if raw["name"] not in known:
                raise errors.InvalidInput(
                    f"unknown output '{raw['name']}'; model '{model.name}' has {_names(model.outputs)}"
                )
            out_params = raw.get("parameters") or {}
            as_binary = out_params.get("binary_data", binary_default) if isinstance(out_params, dict) else False
            wanted.append((raw["name"], bool(as_binary)))
        return wanted

    async def predict_v1(self, name: str, body: bytes) -> dict[str, object]:
        """KServe v1: {"instances": [...]} -> {"predictions": [...]}; one row per instance."""
        model = self.require_ready(name, None)
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise errors.InvalidInput(f"request body is not valid JSON: {err}") from None
        instances = request.get("instances") if isinstance(request, dict) else None
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
                    f"(model '{model.name}' takes {_names(model.inputs)})"
                )
            inputs[spec.name] = _stack(spec, rows)
        outputs = await self.batcher.submit(inputs)
        names = [t.name for t in model.outputs]
        predictions: list[object] = []
        for row in range(len(instances)):
            values = {n: outputs[n][row].tolist() for n in names}
            predictions.append(values[names[0]] if len(names) == 1 else values)
        return {"predictions": predictions}

    async def classify(self, name: str, version: str | None, image: bytes, top_k: str | None) -> dict[str, object]:
        """An image in, the card's preprocessing applied, the top-k classes with softmax probabilities out."""
        model = self.require_ready(name, version)
        card = model.card
        if card is None:
            raise errors.InvalidInput(
                f"classify needs a model card (model-card.json with preprocessing and class names); model "
                f"'{model.name}' was loaded from a plain ONNX file: use /v2/models/{model.name}/infer instead"
            )
        try:
            k = int(top_k) if top_k is not None else 5
        except ValueError:
            raise errors.InvalidInput(f"top_k must be a positive integer, got {top_k!r}") from None
        if k < 1:
            raise errors.InvalidInput(f"top_k must be a positive integer, got {k}")
        by_name = {t.name: t for t in model.inputs}
        spec = by_name.get(card.input.name) or model.inputs[0]
        tensor = images.to_tensor(images.decode(image), card.preprocessing, codec.NUMPY_DTYPES[spec.datatype])
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


def _names(items: list[TensorInfo] | list[str]) -> str:
    return ", ".join(f"'{i.name if isinstance(i, TensorInfo) else i}'" for i in items)


def _stack(spec: TensorInfo, rows: list[object]) -> codec.Array:
    """KServe v1 instances of one input, stacked along a new first dimension and checked like v2 tensors."""
    try:
        array = np.asarray(rows, dtype=codec.NUMPY_DTYPES.get(spec.datatype, np.float32))
    except (ValueError, TypeError, OverflowError) as err:
        raise errors.InvalidInput(
            f"input '{spec.name}': instances are not {spec.datatype} arrays of one shape ({err})"
        ) from None
    codec.check_shape(spec.name, spec.shape, array.shape)
    return array
