"""Binary-extension request headers, remembered once checked. A client sends the same JSON header with every
request of one shape (tritonclient, perf_analyzer and KServe's client write it from the same tensors each time),
and parsing and checking it was a fifth of the event loop's work per binary request: a header seen before maps
straight to its layout, and only what varies (the tensors' bytes) is checked again."""

import threading
from dataclasses import dataclass
from typing import Any

from kiln_serving import codec, protocol
from kiln_serving.model import Model

# Headers longer than this are not remembered (a header of a few tensors is a few hundred bytes), nor more than
# MAX_LAYOUTS of them: at most ~1 MB, the oldest forgotten first.
MAX_HEADER_BYTES = 4096
MAX_LAYOUTS = 256


@dataclass(frozen=True, slots=True)
class Layout:
    """What a checked header says: each input's name, datatype, shape and byte count in the binary section (in
    order), the outputs asked for, and the request's id."""

    inputs: tuple[tuple[str, str, tuple[int, ...], int], ...]
    outputs: tuple[protocol.Wanted, ...]
    id: str | None
    size: int  # the binary section's length

    def request(self, model: Model, rest: memoryview, allow_non_finite: bool) -> protocol.Request:
        """The request this header and these tensor bytes make, checked as protocol.from_json checks them."""
        tensors: dict[str, codec.Array] = {}
        offset = 0
        for name, datatype, shape, size in self.inputs:
            tensors[name] = codec.from_bytes(name, datatype, shape, rest[offset : offset + size])
            offset += size
        return protocol.Request(protocol.complete(model, tensors, allow_non_finite), list(self.outputs), self.id)


def layout(header: dict[str, Any], request: protocol.Request) -> Layout | None:
    """The layout of a header protocol.from_json took (so every field in it is checked), if all of its inputs are
    binary; None if any comes as JSON `data`, which is parsed anew each time."""
    inputs = []
    for raw in header["inputs"]:
        size = (raw.get("parameters") or {}).get("binary_data_size")
        if size is None:
            return None
        inputs.append((raw["name"], raw["datatype"], request.inputs[raw["name"]].shape, size))
    return Layout(tuple(inputs), tuple(request.outputs), request.id, sum(entry[3] for entry in inputs))


class Layouts:
    """The layouts of headers seen before, by the header's bytes. Looked up from any thread without a lock (a dict
    read holds the GIL); the rare insertions take one."""

    def __init__(self) -> None:
        self._known: dict[bytes, Layout] = {}
        self._adding = threading.Lock()

    def get(self, body: bytes | memoryview, header_length: int | None) -> Layout | None:
        """The layout of the body's header if it was seen and the binary section after it is as long as it says;
        else None (parse it)."""
        if header_length is None or not 0 < header_length <= min(len(body), MAX_HEADER_BYTES):
            return None
        found = self._known.get(bytes(body[:header_length]))
        return found if found is not None and found.size == len(body) - header_length else None

    def remember(self, body: bytes | memoryview, header_length: int | None, found: Layout | None) -> None:
        """The layout of the body's header, which protocol.from_json took."""
        if found is None or header_length is None or header_length > MAX_HEADER_BYTES:
            return
        with self._adding:
            if len(self._known) >= MAX_LAYOUTS:
                del self._known[next(iter(self._known))]
            self._known[bytes(body[:header_length])] = found

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, header: bytes) -> bool:
        return header in self._known
