"""What kiln answers an HTTP/1.1 request head it will not serve, decided from the head alone (connections.py reads
heads and sends the answers): a head too large (431), an Upgrade (kiln upgrades to nothing; gRPC has its own port),
an HTTP version but 1.0 and 1.1 (505), HTTP/1.1 without exactly one Host (RFC 9112 §3.2), and a transfer coding
other than chunked (501)."""

from collections.abc import Sequence

# (status, reason phrase, the message the answer's JSON carries)
Refusal = tuple[int, str, str]


def too_large(max_header_bytes: int) -> Refusal:
    return 431, "Request Header Fields Too Large", f"request head over {max_header_bytes} bytes"


def refusal(
    url: bytes, headers: Sequence[tuple[bytes, bytes]], version: str, upgrade: bool, max_header_bytes: int
) -> Refusal | None:
    """The answer a head gets instead of being served, before any of its body is parsed; None to serve it. Its size
    is counted from its fields: bytes are counted as they come too, but part of a head pipelined behind another
    request came with that request's bytes."""
    if len(url) + sum(len(name) + len(value) + 4 for name, value in headers) > max_header_bytes:
        return too_large(max_header_bytes)
    if upgrade:  # llhttp stops at an upgrade: the body would never be parsed
        return 400, "Bad Request", "this server does not upgrade HTTP/1.1 connections: send it without Upgrade"
    if version not in ("1.0", "1.1"):
        return 505, "HTTP Version Not Supported", f"HTTP/{version} is not spoken here: send HTTP/1.1"
    hosts = sum(name == b"host" for name, _ in headers)  # RFC 9112 §3.2: a server MUST refuse both
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        wanted = "needs exactly one" if version == "1.1" else "may have at most one"
        return 400, "Bad Request", f"an HTTP/{version} request {wanted} Host header; this one has {hosts}"
    for name, value in headers:
        if name == b"transfer-encoding":
            codings = [coding.strip().lower() for coding in value.split(b",")]
            if any(coding != b"chunked" for coding in codings):
                given = value.decode("latin-1")[:40]
                return 501, "Not Implemented", f"transfer coding {given!r} is not supported (only chunked)"
    return None
