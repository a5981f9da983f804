"""JSON text in: requests -> Python with the large numeric arrays parsed straight into numpy (jsonwrite.py
writes the answers).

`json.loads` turns every number into a Python float (32 bytes each, ~5x the text of short numbers) and holds
the interpreter lock for the whole call: a 40 MB body took seconds during which no other request was
answered. Here long runs of numeric array text outside strings are cut out, the small rest goes through
`json.loads` (nesting depth checked first), and each run is parsed in slices by orjson straight into numpy
(lock released between slices, memory bounded by the body plus the array; nesting inside a run is flattened,
as the shape decides).
Anything the fast path is unsure of (a number numpy reads differently, NaN, an array where no tensor data
belongs) falls back to plain json: its C decoder up to _C_DECODE_MAX of text, its pure-Python one past that (the
GIL changes hands while it runs), within `decoded`, which keeps the collector out of the way and frees what the
parse made on the decoding thread.
"""

import contextlib
import functools
import gc
import json
import json.decoder
import json.scanner
import operator
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

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
# Most members a JSON object of a request may have (as MAX_INFER_FIELDS bounds a gRPC message): the protocol's
# objects have a handful, and 3 M request parameters took 1.2 GB and seconds of the GIL to parse.
MAX_MEMBERS = 4096
# Most text json's C decoder parses at once. It holds the GIL throughout, up to ~30 ms a MiB (a 60 MB body of
# 3 M request parameters held it 2.5 s, one of NaN values 0.64 s); past this the text goes to json's pure-Python
# decoder, 4-50x slower but switching threads every few milliseconds, so the server keeps answering. Only what the
# numeric fast path cannot take gets there: large arrays of strings, booleans or NaN, or absurd requests.
_C_DECODE_MAX = 512 * 1024

# Text scanned at a time (for runs, for nesting): the regular-expression engine holds the GIL for a whole match,
# and one match over the array of a 60 MB body took 140 ms; between windows other threads get their turn. (One
# expression over the whole text also went quadratic on a string that never ends: 100 KB of \\" took 36 s.)
_WINDOW = 1 << 20
# A string is matched whole in one step when short and inside the window (group 1: its closing quote); the rest
# of a longer one is matched a window at a time (_IN_STRING, by _span).
_STRING = rb'"(?:[^"\\]|\\.){0,4096}(")?'
_IN_STRING = re.compile(rb'(?:[^"\\]|\\.)*')
# A run is `[`, then at least _MIN_RUN of _IN_ARRAY's characters, then `]`, outside any string.
_OPENING = re.compile(_STRING + rb"|\[")
_IN_ARRAY = re.compile(rb"[-0-9.eE,\s\[\]]*")
_STRUCTURE = re.compile(_STRING + rb"|[\[\]{}]")
_QUOTE, _OPENERS = ord('"'), (ord("["), ord("{"))
# numpy kinds parsed here: floats, signed and unsigned integers (an integer array with a fraction or an exponent is
# left to json.loads, as is one with a value the datatype does not hold: its error says so).
_NUMBERS = frozenset("fiu")


class Deferred:
    """A numeric array not parsed yet (text[start:end] of the body, not copied): `to_numpy(dtype)` parses it,
    `value()` gives json.loads's answer."""

    def __init__(self, text: bytes, start: int, end: int) -> None:
        self.text, self.start, self.end = text, start, end

    def to_numpy(self, dtype: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
        """The flat array, or None when the text is not a plain array of JSON numbers (the caller then uses
        value(), which says what is wrong)."""
        if dtype.kind not in _NUMBERS:
            return None
        integers = dtype.kind != "f"
        parts = []
        for piece in _slices(self.text, self.start, self.end):
            if integers and (b"." in piece or b"e" in piece or b"E" in piece):
                return None
            try:  # orjson reads exactly JSON's numbers (no NaN, no trailing commas) and fast
                values = orjson.loads(b"[" + piece.translate(None, b"[]") + b"]")
                part = _integers(values, dtype) if integers else np.array(values, dtype=dtype)
            except (orjson.JSONDecodeError, ValueError, TypeError):
                return None
            if part is None:
                return None
            parts.append(part)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def value(self) -> object:
        return loads(self.text[self.start : self.end], (self.text, functools.partial(operator.add, self.start)))


def _integers(values: list[Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
    """values as an array of dtype, or None unless all are integers it holds (orjson reads one past the 64-bit
    range as a float; numpy would then cast it silently)."""
    array = np.array(values)
    if array.dtype.kind not in "iu":
        return None
    limits = np.iinfo(dtype)
    if array.size and (array.min() < limits.min or array.max() > limits.max):
        return None
    return array.astype(dtype, copy=False)


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
    depth, pos, size = 0, 0, len(raw)
    while pos < size:
        stop = min(pos + _WINDOW, size)
        for token in _STRUCTURE.finditer(raw, pos, stop):
            char = raw[token.start()]
            if char == _QUOTE:
                if token.group(1) is None:  # a string longer than the match: on past it
                    pos = _past_string(token, raw)
                    break
            elif char in _OPENERS:
                depth += 1
                if depth > MAX_DEPTH:
                    raise errors.InvalidInput(f"request JSON is nested deeper than {MAX_DEPTH} levels")
            else:
                depth -= 1
        else:
            pos = stop


# Where a text parsed stands in the body: the body, and a map from a byte offset in the text to one in the body.
Within = tuple[bytes, Callable[[int], int]]


def loads(text: bytes, within: Within | None = None) -> object:
    """json.loads with the depth check, objects of at most MAX_MEMBERS members; InvalidInput for anything that is
    not JSON, placed in the body when the text stands for part of it (`within`: a skeleton, a run). Text over
    _C_DECODE_MAX goes to json's pure-Python decoder (see there)."""
    check_depth(text)
    try:
        if len(text) <= _C_DECODE_MAX:
            return json.loads(text, object_pairs_hook=_object)
        decoder = json.JSONDecoder(object_pairs_hook=_object)
        decoder.memo = _NoMemo()  # type: ignore[attr-defined]
        decoder.parse_string = json.decoder.py_scanstring  # type: ignore[attr-defined]
        decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
        document = decoder.decode(text.decode(json.detect_encoding(text), "surrogatepass"))  # as json.loads does
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise errors.InvalidInput(f"request body is not valid JSON: {_placed(err, text, within)}") from None
    parsed: list[object] | None = getattr(_parsed, "documents", None)
    if parsed is not None:
        parsed.append(document)
    return document


def _placed(err: Exception, text: bytes, within: Within | None) -> str:
    """err's message, with the position json gives in `text` moved to where it is in the body, in json's words."""
    if within is None:
        return str(err)
    body, at = within
    if isinstance(err, json.JSONDecodeError):  # err.pos counts characters, decoded as json.loads decodes bytes
        before = body[: at(len(err.doc[: err.pos].encode(json.detect_encoding(text), "surrogatepass")))]
        chars = before.decode(json.detect_encoding(body), "surrogatepass")
        line, column = chars.count("\n") + 1, len(chars) - chars.rfind("\n")
        return f"{err.msg}: line {line} column {column} (char {len(chars)})"
    if isinstance(err, UnicodeDecodeError):
        return str(UnicodeDecodeError(err.encoding, body, at(err.start), at(err.end - 1) + 1, err.reason))
    return str(err)


class _NoMemo(dict[str, str]):
    """The pure-Python scanner's memo of keys, keeping none: it shares equal keys' strings, and clears the memo once
    the text is parsed, one call holding the GIL ~0.1 s for 3 M keys."""

    def setdefault(self, key: str, default: str | None = None) -> str:
        return key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused past MAX_MEMBERS members. Those pairs are let go a slice at a time: 3 M of them freed
    at once held the GIL ~0.1 s."""
    if len(pairs) <= MAX_MEMBERS:
        return dict(pairs)
    count = len(pairs)
    while pairs:
        del pairs[-_FREED_AT_ONCE:]
    raise errors.InvalidInput(f"request JSON has an object of {count} members; at most {MAX_MEMBERS}")


# Items (pairs, list items) let go at a time by _object and _let_go.
_FREED_AT_ONCE = 1 << 16
T = TypeVar("T")


def decoded(size: int, decode: Callable[..., T], *args: Any) -> T:
    """decode(*args), the decoding of a body of `size` bytes of JSON, with all that json made of it freed before
    this returns or raises, on this thread. For a large body the cyclic garbage collector is off meanwhile: each
    collection walks every container the parse has made so far, holding the GIL (0.15 s at a time for 2.5 M small
    lists); reference counting frees them all the same. An error is raised again without its traceback, whose
    frames would keep the parsed body alive until the event loop dropped it, and freed it there."""
    if size <= _C_DECODE_MAX:
        return decode(*args)
    outer, _parsed.documents = getattr(_parsed, "documents", None), []
    with _collector.off():
        try:
            return decode(*args)
        except errors.ServingError as err:
            error, err.__traceback__, err.__context__, err.__cause__ = err, None, None, None
            for document in _parsed.documents:
                _let_go(document)
        finally:
            _parsed.documents = outer
    raise error


# Large documents the pure-Python decoder made on this thread within `decoded` (let go by `_let_go` on an error).
_parsed = threading.local()


def _let_go(document: object) -> None:
    """Take a parsed document apart a slice at a time, each slice's containers before the next slice: 5 M strings
    freed in one call held the GIL ~70 ms (the pure-Python decoder parses what the numeric fast path cannot, such as
    strings)."""
    pending = [document]
    while pending:
        value = pending.pop()
        if type(value) is dict:  # at most MAX_MEMBERS members
            pending += [item for item in value.values() if type(item) in _CONTAINERS]
            value.clear()
        elif type(value) is list and value:
            part = value[-_FREED_AT_ONCE:]
            del value[-_FREED_AT_ONCE:]
            pending.append(value)  # the rest of it, after this part's containers
            if not _CONTAINERS.isdisjoint(map(type, part)):
                pending += [item for item in part if type(item) in _CONTAINERS]
            del part  # its strings and numbers go now; its containers wait in pending


_CONTAINERS = frozenset((list, dict))  # what json makes (objects through _object: plain dicts)


class _Collector:
    """gc.disable() for as long as any large body is being decoded, then gc.enable() if it was on before."""

    def __init__(self) -> None:
        self.lock, self.decoding, self.was_on = threading.Lock(), 0, False

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        with self.lock:
            if self.decoding == 0:
                self.was_on = gc.isenabled()
                gc.disable()
            self.decoding += 1
        try:
            yield
        finally:
            with self.lock:
                self.decoding -= 1
                if self.decoding == 0 and self.was_on:
                    gc.enable()


_collector = _Collector()


# Where a request's tensor data may sit: (the object holding it, its key) for each place, given the parsed rest.
Slots = Callable[[object], Iterator[tuple[dict[str, Any], str]]]


def inputs_data(skeleton: object) -> Iterator[tuple[dict[str, Any], str]]:
    """Where tensor data sits in an Open Inference Protocol request: each inputs[i].data."""
    inputs = skeleton.get("inputs") if isinstance(skeleton, dict) else None
    for item in inputs if isinstance(inputs, list) else []:
        if isinstance(item, dict):
            yield item, "data"


def instances(skeleton: object) -> Iterator[tuple[dict[str, Any], str]]:
    """Where tensor data sits in a KServe v1 request: its instances, all of them."""
    if isinstance(skeleton, dict):
        yield skeleton, "instances"


def loads_request(text: bytes, slots: Slots = inputs_data) -> object:
    """Like loads, but the values at `slots` (inputs[i].data by default) may come back as Deferreds (see the
    module docstring)."""
    if len(text) < _MIN_RUN:
        return loads(text)
    marker = "\0kiln-" + secrets.token_hex(8)
    runs: list[tuple[int, int]] = []
    pieces: list[bytes] = []
    last = 0
    for start, end in _runs(text):
        pieces += [text[last:start], json.dumps({marker: len(runs)}).encode()]
        runs.append((start, end))
        last = end
    if not runs:
        return loads(text)
    pieces.append(text[last:])
    markers = [len(piece) for piece in pieces[1::2]]
    skeleton = loads(b"".join(pieces), (text, functools.partial(_in_text, runs, markers)))
    balanced = all(_count(text, b"[", a, b) == _count(text, b"]", a, b) for a, b in runs)
    if not balanced or not _swap(skeleton, slots, marker, [Deferred(text, a, b) for a, b in runs]):
        return loads(text)
    return skeleton


def _in_text(runs: list[tuple[int, int]], markers: list[int], offset: int) -> int:
    """Where a byte of the skeleton (the text with a marker of markers[i] bytes in place of runs[i]) is in the
    text; a byte of a marker stands for its run's first."""
    moved = 0
    for (start, end), size in zip(runs, markers, strict=True):
        if offset < start - moved:
            break
        if offset < start - moved + size:
            return start
        moved += end - start - size
    return offset + moved


def _runs(text: bytes) -> Iterator[tuple[int, int]]:
    """The spans of the runs (each the longest `[` ... `]` of array characters from its `[`, outside strings),
    found a window at a time instead of by one regular expression over the whole text."""
    pos, size = 0, len(text)
    while pos < size:
        stop = min(pos + _WINDOW, size)
        for token in _OPENING.finditer(text, pos, stop):
            start = token.start()
            if text[start] == _QUOTE:
                if token.group(1) is None:  # a string longer than the match: on past it
                    pos = _past_string(token, text)
                    break
                continue
            # Nothing within [start, end) starts a run if this does not, and nothing after the run's `]` does.
            pos = _span(_IN_ARRAY, text, start + 1)
            close = text.rfind(b"]", start + 1, pos)
            if close - (start + 1) >= _MIN_RUN:
                yield start, close + 1
            break
        else:
            pos = stop


def _past_string(token: re.Match[bytes], text: bytes) -> int:
    """Where the string a token starts ends, past its closing quote (unterminated: past the text's end, and
    json.loads will say what is wrong)."""
    if token.group(1) is not None:
        return token.end()
    return _span(_IN_STRING, text, token.end()) + 1


def _span(pattern: re.Pattern[bytes], text: bytes, pos: int) -> int:
    """Where the pattern's match from pos ends, matched a window at a time (a window may end inside a string's
    two-byte escape: its backslash then starts the next window, which always has room for both)."""
    while True:
        stop = min(pos + _WINDOW + 1, len(text))
        end = pattern.match(text, pos, stop).end()  # type: ignore[union-attr]  # a `*` pattern always matches
        if stop == len(text) or end < stop - 1 or (end == stop - 1 and text[end] != ord("\\")):
            return end
        pos = end


def _count(text: bytes, char: bytes, start: int, end: int) -> int:
    """text.count(char, start, end), a window at a time (one count over 60 MB held the GIL 45-70 ms here)."""
    return sum(text.count(char, at, min(at + _WINDOW, end)) for at in range(start, end, _WINDOW))


def _swap(skeleton: object, slots: Slots, marker: str, runs: list[Deferred]) -> bool:
    """Swap the markers at the slots for Deferreds; False if a marker sits anywhere else."""
    found = 0
    for holder, key in slots(skeleton):
        value = holder.get(key)
        if isinstance(value, dict) and marker in value:
            holder[key] = runs[value[marker]]
            found += 1
    return found == len(runs)
