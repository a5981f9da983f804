"""JSON text both ways: requests -> Python with the large numeric arrays parsed straight into numpy, and
responses written by orjson (numpy arrays natively; NaN and infinities as null, so always RFC 8259 JSON).

`json.loads` turns every number into a Python float (32 bytes each, ~5x the text of short numbers) and holds
the interpreter lock for the whole call: a 40 MB body took seconds during which no other request was
answered. Here long runs of numeric array text outside strings are cut out, the small rest goes through
`json.loads` (nesting depth checked first), and each run is parsed in slices by orjson straight into numpy
(lock released between slices, memory bounded by the body plus the array; nesting inside a run is flattened,
as the shape decides).
Anything the fast path is unsure of (a number numpy reads differently, NaN, an array where no tensor data
belongs) falls back to plain `json.loads`.
"""

import json
import re
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from kiln_serving import errors

# Bodies and arrays shorter than this are left to json.loads whole.
_MIN_RUN = 64 * 1024
# Array text parsed at once: small enough to let other threads in between and to bound the Python floats
# alive at a time, large enough to be fast.
_SLICE = 256 * 1024
# Deepest nesting accepted; Python's json recurses per level and would fail with RecursionError (a 500).
MAX_DEPTH = 64

_RUNS = re.compile(rb'"(?:[^"\\]|\\.)*"|\[[-0-9.eE,\s\[\]]{%d,}\]' % _MIN_RUN)
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[{]|[\]}]')
_FLOATS = frozenset("f")


class Deferred:
    """A numeric array not parsed yet (text[start:end] of the body, not copied): `to_numpy(dtype)` parses it,
    `value()` gives json.loads's answer."""

    def __init__(self, text: bytes, start: int, end: int) -> None:
        self.text, self.start, self.end = text, start, end

    def to_numpy(self, dtype: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
        """The flat array, or None when the text is not a plain array of JSON numbers (the caller then uses
        value(), which says what is wrong)."""
        if dtype.kind not in _FLOATS:
            return None
        parts = []
        for piece in _slices(self.text, self.start, self.end):
            try:  # orjson reads exactly JSON's numbers (no NaN, no trailing commas) and fast
                values = orjson.loads(b"[" + piece.translate(None, b"[]") + b"]")
                parts.append(np.array(values, dtype=dtype))
            except (orjson.JSONDecodeError, ValueError, TypeError):
                return None
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def value(self) -> object:
        return loads(self.text[self.start : self.end])


def dumps(content: object) -> bytes:
    """Compact JSON of dicts, lists, scalars and numpy arrays."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _slices(text: bytes, start: int, stop: int) -> Iterator[bytes]:
    """text[start:stop] in pieces of about _SLICE bytes cut at commas."""
    while start < stop:
        end = stop if stop - start <= _SLICE else text.rfind(b",", start, start + _SLICE)
        if end <= start:
            end = stop
        yield text[start:end]
        start = end + 1


def check_depth(text: bytes | str) -> None:
    """InvalidInput for nesting deeper than MAX_DEPTH (strings skipped), before any recursive parser sees it."""
    raw = text.encode() if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for match in _BRACKETS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise errors.InvalidInput(f"request JSON is nested deeper than {MAX_DEPTH} levels")
        elif token in (b"]", b"}"):
            depth -= 1


def loads(text: bytes) -> object:
    """json.loads with the depth check; InvalidInput for anything that is not JSON."""
    check_depth(text)
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise errors.InvalidInput(f"request body is not valid JSON: {err}") from None


def loads_request(text: bytes) -> object:
    """Like loads, but `inputs[i].data` may come back as a Deferred (see the module docstring)."""
    if len(text) < _MIN_RUN:
        return loads(text)
    marker = "\0kiln-" + secrets.token_hex(8)
    runs: list[tuple[int, int]] = []
    pieces: list[bytes] = []
    last = 0
    for match in _RUNS.finditer(text):
        if text[match.start()] == ord('"'):  # a string, skipped whole
            continue
        pieces += [text[last : match.start()], json.dumps({marker: len(runs)}).encode()]
        runs.append(match.span())
        last = match.end()
    if not runs:
        return loads(text)
    pieces.append(text[last:])
    skeleton = loads(b"".join(pieces))
    balanced = all(text.count(b"[", a, b) == text.count(b"]", a, b) for a, b in runs)
    if not balanced or not _only_in_data(skeleton, marker, [Deferred(text, a, b) for a, b in runs]):
        return loads(text)
    return skeleton


def _only_in_data(skeleton: object, marker: str, runs: list[Deferred]) -> bool:
    """Swap the markers in inputs[i].data for Deferreds; False if a marker sits anywhere else."""
    found = 0
    inputs = skeleton.get("inputs") if isinstance(skeleton, dict) else None
    for item in inputs if isinstance(inputs, list) else []:
        if isinstance(item, dict) and isinstance(item.get("data"), dict) and marker in item["data"]:
            item["data"] = runs[item["data"][marker]]
            found += 1
    return found == len(runs)
