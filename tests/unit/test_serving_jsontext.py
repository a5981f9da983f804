"""jsontext's scans of a request body, which run a window at a time so that no single regular-expression match
holds the GIL across a large body: they find what one expression over the whole text finds, and never go
quadratic on strings that do not end."""

import gc
import itertools
import json
import random
import re
import sys
import threading
import time
import weakref

import numpy as np
import pytest

from kiln_serving import errors, jsontext, jsonwrite


def document(rng: random.Random, depth: int = 0) -> object:
    """A random JSON value: numbers, arrays of numbers, strings full of brackets, quotes and backslashes."""
    kind = rng.randrange(5 if depth < 6 else 2)
    if kind == 0:
        return rng.choice([0, -7, 2.5, -2.5e3, 1e-9, 12345678901])
    if kind == 1:
        return "".join(rng.choice(['"', "\\", "[", "]", "{", "}", "x", " ", ",", "1"]) for _ in range(rng.randrange(8)))
    if kind == 2:
        return [rng.choice([1, -2.5, 3e4]) for _ in range(rng.randrange(12))]
    if kind == 3:
        return [document(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": document(rng, depth + 1) for i in range(rng.randrange(4))}


def texts(n: int) -> list[bytes]:
    rng = random.Random(16)
    separators = [(",", ":"), (", ", ": "), (" ,\n", " : ")]
    return [json.dumps(document(rng), separators=rng.choice(separators)).encode() for _ in range(n)]


def depth_of(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@pytest.mark.parametrize("window", [1, 2, 3, 7, 1 << 20])
def test_runs_found_a_window_at_a_time_are_those_one_expression_finds(
    window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsontext, "_WINDOW", window)
    for min_run in (0, 3, 8):
        monkeypatch.setattr(jsontext, "_MIN_RUN", min_run)
        whole = re.compile(rb'"(?:[^"\\]|\\.)*"|\[[-0-9.eE,\s\[\]]{%d,}\]' % min_run)
        for text in texts(400):
            expected = [m.span() for m in whole.finditer(text) if text[m.start()] != ord('"')]
            assert list(jsontext._runs(text)) == expected, text


@pytest.mark.parametrize("window", [1, 2, 5, 1 << 20])
def test_nesting_counted_a_window_at_a_time_is_the_documents_depth(
    window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsontext, "_WINDOW", window)
    monkeypatch.setattr(jsontext, "MAX_DEPTH", 2)
    for text in texts(400):
        if depth_of(json.loads(text)) > 2:
            with pytest.raises(errors.InvalidInput, match="nested deeper than 2 levels"):
                jsontext.check_depth(text)
        else:
            jsontext.check_depth(text)


@pytest.mark.timeout(60)  # linear: milliseconds; quadratic: an hour
@pytest.mark.parametrize("size", [60_000, 1_000_000])
def test_a_string_that_never_ends_is_scanned_once(size: int) -> None:
    # One expression matching strings tried every quote again to the end of the text: 100 KB of \" took 36 s,
    # holding the GIL (a megabyte, an hour). Enough brackets for the depth check to scan, not too deep; large
    # enough for the run scan.
    text = b'{"x": [], "inputs": ' + b"[" * (jsontext.MAX_DEPTH - 1) + b'"' + b'\\"' * (size // 2)
    with pytest.raises(errors.InvalidInput, match="not valid JSON"):
        jsontext.loads_request(text)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64", "uint64", "float32"])
def test_an_array_parsed_in_slices_is_what_json_loads_and_numpy_make_of_it_or_left_to_them(dtype: str) -> None:
    # The slow path (json.loads, then numpy) is the reference: the fast one gives the same array, or none at all
    # (a fraction in an integer array, a value the datatype cannot hold, a number past 64 bits).
    rng = random.Random(dtype)
    pool = ["0", "-1", "7", "127", "128", "255", "256", "-129", "65535", "2147483648", "-9223372036854775808",
            "9223372036854775807", "18446744073709551615", "18446744073709551616", "1.5", "-2e3", "1E2"]  # fmt: skip
    for _ in range(300):
        numbers = [rng.choice(pool[:10]) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.5:
            numbers[rng.randrange(len(numbers))] = rng.choice(pool)
        text = ("[" + ",".join(numbers) + "]").encode()
        try:
            expected = np.asarray(json.loads(text), dtype=dtype)
        except OverflowError:
            expected = None
        got = jsontext.Deferred(text, 0, len(text)).to_numpy(np.dtype(dtype))
        if got is None:
            plain = all(n in pool[:10] for n in numbers) and expected is not None
            assert not plain, text  # only what the slow path must judge is left to it
        else:
            assert expected is not None and got.dtype == expected.dtype and np.array_equal(got, expected), text


def test_a_large_text_parsed_by_the_pure_python_decoder_is_what_json_loads_makes_of_it() -> None:
    # Past _C_DECODE_MAX the text goes to json's pure-Python decoder (the GIL changes hands while it runs): the
    # same values, the same errors.
    rng = random.Random(7)
    values = [document(rng) for _ in range(4000)] + ['é\u2028\\"', float("nan"), -float("inf"), True, None]
    text = json.dumps({"values": values, "text": "x" * jsontext._C_DECODE_MAX}).encode()
    assert len(text) > jsontext._C_DECODE_MAX
    got, expected = jsontext.loads(text), json.loads(text)
    assert isinstance(got, dict) and json.dumps(got) == json.dumps(expected)  # NaN != NaN: compared as text
    for broken in (text[:-1], text.replace(b'"text"', b"'text'"), text + b"]"):
        with pytest.raises(errors.InvalidInput, match="not valid JSON"):
            jsontext.loads(broken)


@pytest.mark.parametrize("size", [1000, 1 << 20], ids=["small", "large"])
def test_an_object_of_more_than_max_members_is_refused(size: int) -> None:
    members = {f"k{i}": i for i in range(jsontext.MAX_MEMBERS)}
    text = json.dumps({"parameters": members, "pad": "x" * size}).encode()
    assert jsontext.loads(text) == {"parameters": members, "pad": "x" * size}
    members["one more"] = 0
    with pytest.raises(errors.InvalidInput, match=f"an object of 4097 members; at most {jsontext.MAX_MEMBERS}"):
        jsontext.loads(json.dumps({"parameters": members, "pad": "x" * size}).encode())


def test_a_large_body_is_decoded_with_the_collector_off_and_freed_before_an_error_leaves() -> None:
    class Parsed:
        """Stands for what json made of a body: a weak reference tells when it is freed."""

    seen: list[weakref.ref[Parsed]] = []
    collector_on: list[bool] = []

    def decode(fail: bool) -> Parsed:
        parsed = Parsed()
        seen.append(weakref.ref(parsed))
        collector_on.append(gc.isenabled())
        if fail:
            raise errors.InvalidInput("refused")
        return parsed

    assert gc.isenabled()
    large = jsontext._C_DECODE_MAX + 1
    assert isinstance(jsontext.decoded(large, decode, False), Parsed) and collector_on == [False]
    with pytest.raises(errors.InvalidInput, match="refused") as refused:
        jsontext.decoded(large, decode, True)
    assert seen[-1]() is None  # the frame holding it went with the traceback, before the error left
    assert refused.value.__context__ is None and collector_on == [False, False] and gc.isenabled()
    jsontext.decoded(10, decode, False)
    assert collector_on[-1]  # a small body changes nothing


@pytest.mark.parametrize("count", [0, 1, 5, 6, 7, 23])
def test_arrays_written_in_slices_make_the_document_json_makes(count: int) -> None:
    # Slices of 3 items, arrays beside text holding escaped NUL bytes (the mark dumps puts sliced arrays in by).
    rng = random.Random(count)
    items = [document(rng) for _ in range(count)]
    numbers = np.arange(count * 2, dtype=np.float32).reshape(count, 2) / 4
    content = {
        "a\0": "\0[\0]",
        "items": jsonwrite.dumps_sliced(count, 3, lambda start, stop: items[start:stop]),
        "rows": [jsonwrite.dumps_sliced(count, 3, lambda start, stop: numbers[start:stop]), None],
    }
    expected = {"a\0": "\0[\0]", "items": items, "rows": [numbers.tolist(), None]}
    assert json.loads(jsonwrite.dumps(content)) == expected


def test_a_refused_large_document_is_taken_apart_while_other_threads_take_turns() -> None:
    # A million strings (the pure-Python decoder's case) freed in one call hold the GIL throughout (~15 ms here,
    # 70 ms for 5 M): no other thread runs. Taken apart a slice at a time, another thread gets turns in between.
    text = json.dumps({"inputs": [{"name": "x", "data": [f"s{i}" for i in range(1_000_000)]}]}).encode()
    turns: list[float] = []
    refused = threading.Event()

    def take_turns() -> None:
        while not refused.is_set():
            turns.append(time.perf_counter())

    other_thread = threading.Thread(target=take_turns)

    def decode() -> None:
        jsontext.loads(text)
        other_thread.start()
        window.append(time.perf_counter())
        raise errors.InvalidInput("refused")

    window: list[float] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        with pytest.raises(errors.InvalidInput, match="refused"):
            jsontext.decoded(len(text), decode)
        window.append(time.perf_counter())
    finally:
        refused.set()
        sys.setswitchinterval(interval)
    other_thread.join()
    during = [t for t in turns if window[0] <= t <= window[1]]
    # Separate turns: the other thread's stamps follow each other within a microsecond or so while it runs.
    separate = len(during) and 1 + sum(b - a > 20e-6 for a, b in itertools.pairwise(during))
    assert separate >= 8, f"{separate} turns of another thread while the document was let go"


DATA = ",".join(["1.5"] * 50_000)  # one run: well past _MIN_RUN, so the rest is parsed as a skeleton around it
NOT_JSON = {  # RUN stands for DATA
    "after a run": '{"inputs":[{"name":"x","data":[RUN]}] "oops"}',
    "at a run's end": '{"inputs":[{"name":"x","data":[RUN,]}]}',
    "inside a run, on line 2": '{"inputs":[{"name":"x",\n"data":[RUN,1.5 1.5]}]}',
    "after two runs and a name not ASCII": '{"inputs":[{"name":"é","data":[RUN]},{"name":"y","data":[RUN]} ,, ]}',
}


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["utf-8", "utf-8 with BOM"])
@pytest.mark.parametrize("text", NOT_JSON.values(), ids=NOT_JSON.keys())
def test_a_large_body_that_is_not_json_is_refused_at_the_place_json_loads_names(text: str, bom: bytes) -> None:
    body = bom + text.replace("RUN", DATA).encode()
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(body)
    with pytest.raises(errors.InvalidInput) as refused:
        request = jsontext.loads_request(body)
        jsontext.Deferred.value(request["inputs"][0]["data"])  # type: ignore[index]  # the run parsed last
    assert str(refused.value) == f"request body is not valid JSON: {expected.value}"


def test_a_byte_not_utf_8_after_a_run_is_refused_at_its_place_in_the_body() -> None:
    body = b'{"inputs":[{"name":"x","data":[%s]}],"id":"\xff"}' % DATA.encode()
    with pytest.raises(UnicodeDecodeError) as expected:
        json.loads(body)
    with pytest.raises(errors.InvalidInput) as refused:
        jsontext.loads_request(body)
    assert str(refused.value) == f"request body is not valid JSON: {expected.value}"
