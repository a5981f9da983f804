"""JSON text out: answers written by orjson (numpy arrays natively; NaN and infinities as null, so always RFC 8259
JSON), large arrays a slice at a time (jsontext.py reads the requests)."""

from collections.abc import Callable

import orjson


class Sliced:
    """A JSON array already written a slice at a time (`dumps_sliced`), for `dumps` to put in its place."""

    __slots__ = ("texts",)

    def __init__(self, texts: list[bytes]) -> None:
        self.texts = texts  # the array's text in order, brackets and the commas between slices included


def dumps(content: object) -> bytes:
    """Compact JSON of dicts, lists, scalars and numpy arrays, and of `Sliced` arrays: orjson writes a mark
    for each (a NUL byte, which it never writes itself: control characters in strings are escaped) and one
    bytes.join puts them in, a copy that releases the GIL (orjson copying a 45 MB fragment held it 18-26 ms)."""
    sliced: list[Sliced] = []

    def mark(value: object) -> orjson.Fragment:
        if not isinstance(value, Sliced):
            raise TypeError(f"{type(value).__name__} is not JSON")
        sliced.append(value)
        return orjson.Fragment(b"\0")

    text = orjson.dumps(content, default=mark, option=orjson.OPT_SERIALIZE_NUMPY)
    if not sliced:
        return text
    around = text.split(b"\0")
    pieces = [around[0]]
    for array, after in zip(sliced, around[1:], strict=True):
        pieces += [*array.texts, after]
    return b"".join(pieces)


def dumps_sliced(count: int, size: int, items: Callable[[int, int], object]) -> Sliced:
    """A JSON array of `count` items written `size` at a time (items(start, stop): those items, as dumps takes
    them), to go in a document dumps writes: orjson writes an array in one call holding the GIL (5 M floats:
    0.14 s)."""
    texts = [dumps(items(at, min(at + size, count))) for at in range(0, count, size)] or [b"[]"]
    if len(texts) > 1:  # "[a,b" "c,d" "e]", joined by commas
        inner = [texts[0][:-1], *(text[1:-1] for text in texts[1:-1]), texts[-1][1:]]
        texts = [piece for text in inner for piece in (text, b",")][:-1]
    return Sliced(texts)
