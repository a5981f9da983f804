"""The closed-loop HTTP/1.1 client both serving benches drive servers with.

Standard library only (it also runs on the GPU machine, where kiln's dependencies may be missing): one keep-alive
connection per simulated user, the same pre-encoded request again and again, latency per 200 answer.
"""

import asyncio
import time


async def client(port: int, request: bytes, until: float, latencies: list[float], errors: list[int]) -> None:
    """Send `request` back to back until `until`; append each 200's latency, and a 1 per other answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))  # fmt: skip
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(1)
    finally:
        writer.close()
