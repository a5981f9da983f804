"""bench/gpu_serving.py gives up on a server whose model can never load (here: `--providers cuda` on a
machine without CUDA), instead of waiting out its 300 s start-up limit once per cell."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import gpu_serving  # noqa: E402


def test_a_server_whose_provider_cannot_load_fails_at_once_with_the_servers_reason(tmp_path: Path) -> None:
    model_dir, _ = gpu_serving.build(tmp_path)
    argv = gpu_serving.kiln_argv(model_dir, batching=True, provider="cuda")
    with pytest.raises(RuntimeError, match="the model cannot be served: requested CUDAExecutionProvider"):
        with gpu_serving.server(argv, tmp_path / "server.log"):
            pass
