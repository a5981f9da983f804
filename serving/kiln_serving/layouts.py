"""Inference requests' descriptions, remembered once checked. A client sends the same description of its tensors
with every request of one shape (tritonclient, perf_analyzer and KServe's clients build it from the same tensors
each time): the JSON header of an HTTP request with binary tensors, or a gRPC ModelInferRequest less its
raw_input_contents. Parsing and checking it was a fifth of the event loop's work per request; a description seen
before maps straight to its layout, and only what varies, the tensors' bytes, is checked again."""

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kiln_serving import codec, protocol
from kiln_serving.model import Model

# Descriptions longer than this are not remembered (one of a few tensors is a few hundred bytes), nor more than
# MAX_LAYOUTS of them: at most ~1 MB, the oldest forgotten first.
MAX_KEY_BYTES = 4096
MAX_LAYOUTS = 256


@dataclass(frozen=True, slots=True)
class Layout:
    """What a checked description says: each input's name, datatype, shape and byte count (in order), the outputs
    asked for, and the request's id."""

    inputs: tuple[tuple[str, str, tuple[int, ...], int], ...]
    outputs: tuple[protocol.Wanted, ...]
    id: str | None

    def split(self, rest: memoryview) -> list[memoryview]:
        """An HTTP request's binary section cut into its inputs' bytes; none unless it is exactly their length."""
        parts, offset = [], 0
        for *_, size in self.inputs:
            parts.append(rest[offset : offset + size])
            offset += size
        return parts if offset == len(rest) else []

    def request(self, model: Model, parts: Sequence[memoryview], allow_non_finite: bool) -> protocol.Request | None:
        """The request these inputs' bytes make with this description, checked as the first one was; None when
        their count or sizes are not the description's (parse the request then, for its error)."""
        if len(parts) != len(self.inputs) or any(len(p) != e[3] for p, e in zip(parts, self.inputs, strict=True)):
            return None
        tensors = {name: codec.from_bytes(name, datatype, shape, part)
                   for (name, datatype, shape, _), part in zip(self.inputs, parts, strict=True)}  # fmt: skip
        return protocol.Request(protocol.complete(model, tensors, allow_non_finite), list(self.outputs), self.id)


def layout(names: Sequence[tuple[str, str]], sizes: Sequence[int | None], request: protocol.Request) -> Layout | None:
    """The layout of a request as checked (`request`): its inputs' (name, datatype) as the description gives them
    and their byte counts, None for one whose values came in the description itself (JSON `data`, gRPC
    `contents`), which is then not remembered: those are parsed anew each time."""
    if any(size is None for size in sizes):
        return None
    inputs = tuple((name, datatype, request.inputs[name].shape, size)
                   for (name, datatype), size in zip(names, sizes, strict=True) if size is not None)  # fmt: skip
    return Layout(inputs, tuple(request.outputs), request.id)


def json_layout(header: dict[str, Any], request: protocol.Request) -> Layout | None:
    """The layout of a JSON header protocol.from_json took (so every field in it is checked)."""
    inputs = header["inputs"]
    sizes = [(raw.get("parameters") or {}).get("binary_data_size") for raw in inputs]
    return layout([(raw["name"], raw["datatype"]) for raw in inputs], sizes, request)


class Layouts:
    """The layouts of descriptions seen before, by their bytes. Looked up from any thread without a lock (a dict
    read holds the GIL); the rare insertions take one."""

    def __init__(self) -> None:
        self._known: dict[bytes, Layout] = {}
        self._adding = threading.Lock()

    def get(self, key: bytes | None) -> Layout | None:
        return self._known.get(key) if key is not None else None

    def request(
        self, key: bytes | None, parts: Callable[[Layout], Sequence[memoryview]], model: Model, allow_non_finite: bool
    ) -> protocol.Request | None:
        """The request of a description seen before (`key`) and its inputs' bytes (`parts`, cut by its layout);
        None if it was not seen, or the bytes are not what it says: then the request is parsed in full."""
        found = self.get(key)
        return found.request(model, parts(found), allow_non_finite) if found is not None else None

    def remember(self, key: bytes | None, found: Layout | None) -> None:
        if found is None or key is None or len(key) > MAX_KEY_BYTES:
            return
        with self._adding:
            if len(self._known) >= MAX_LAYOUTS:
                del self._known[next(iter(self._known))]
            self._known[key] = found

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, key: bytes) -> bool:
        return key in self._known


# Keys start with the description's format, so that a JSON header never stands for a gRPC message's bytes.
JSON, GRPC = b"J", b"G"


def header_key(body: bytes | memoryview, header_length: int | None) -> bytes | None:
    """An HTTP request's JSON header, as the key of its layout: None without binary tensors after it, or too long."""
    if header_length is None or not 0 < header_length <= min(len(body), MAX_KEY_BYTES):
        return None
    return JSON + body[:header_length]
