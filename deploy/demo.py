"""`make demo`: train -> compile -> serve -> query the digits example on this machine.

Starts `kiln run FILE --serve` in the background, waits until the server is ready, sends real digit images
(scikit-learn's bundled digits, as PNG files) to the classify endpoint, prints the predictions next to the
true labels and the model card summary, then stops the server with Ctrl-C (SIGINT), as a person would.
"""

import argparse
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from kiln import api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: `kiln run` exited with code {server.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"demo: the server was not ready within {timeout:.0f}s")


def digit_png(pixels: np.ndarray) -> bytes:
    """An 8x8 digit (values 0-16) as a greyscale PNG, the kind of file a person would send."""
    image = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def classify(url: str, model: str, png: bytes) -> dict[str, object]:
    request = urllib.request.Request(
        f"{url}/v2/models/{model}/classify?top_k=1", data=png, headers={"Content-Type": "image/png"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        result: dict[str, object] = json.loads(r.read())
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the TrainingJob YAML to run")
    parser.add_argument("--output", type=Path, help="artifacts folder (default: a temporary folder)")
    parser.add_argument("--samples", type=int, default=12, help="digits to send")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for training and serving")
    args = parser.parse_args()

    name = api.load_trainingjob(args.file).metadata.name
    output = args.output or Path(tempfile.mkdtemp(prefix="kiln-demo-")) / name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "kiln.cli",
        "run",
        str(args.file),
        "--output",
        str(output),
        "--serve",
        "--port",
        str(port),
    ]
    print(f"$ kiln run {args.file} --output {output} --serve --port {port}", flush=True)
    server = subprocess.Popen(cmd)
    try:
        wait_ready(url, server, args.timeout)
        digits = load_digits()
        picks = np.linspace(0, len(digits.target) - 1, args.samples).astype(int)
        print(f"\nsending {len(picks)} digit images to {url}/v2/models/{name}/classify")
        print(f"{'true':>6} {'predicted':>10} {'probability':>12}")
        correct = 0
        for i in picks:
            result = classify(url, name, digit_png(digits.images[i]))
            top = result["predictions"][0]  # type: ignore[index]
            label, probability = str(top["label"]), float(top["probability"])
            correct += label == str(digits.target[i])
            print(f"{digits.target[i]:>6} {label:>10} {probability:>12.3f}")
        print(f"\n{correct}/{len(picks)} correct")
        card = api.ModelCard.read(output / "model-card.json")
        print(f"model card: {output / 'model-card.json'}")
        print(f"  selected variant {card.selected} ({card.selection_reason})")
        print(f"  validation accuracy {card.metrics.accuracy:.4f}, f1 {card.metrics.f1:.4f}")
        for v in card.variants:
            accuracy = "-" if v.accuracy is None else f"{v.accuracy:.4f}"
            latency = "-" if v.latency_ms_batch32 is None else f"{v.latency_ms_batch32:.2f} ms"
            print(f"  {v.name:<13} accuracy {accuracy}  latency@32 {latency}  {v.size_bytes / 1024:.0f} KiB")
        return 0 if correct >= len(picks) // 2 else 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        print("demo: server stopped")


if __name__ == "__main__":
    raise SystemExit(main())
