"""Shared pieces of the trainer tests: small real specs, real CIFAR-10 and image folders on disk, the real
``python -m kiln_trainer`` in a subprocess, and a local HTTP endpoint standing in for the Kubernetes API."""

import contextlib
import copy
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from kiln import api

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [ROOT, ROOT / "operator", ROOT / "trainer", ROOT / "serving"]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Digits with the built-in CNN: fast and real. Tests override what they exercise.
BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "numWorkers": 0},
    "training": {"epochs": 2, "batchSize": 32, "optimizer": {"name": "adamw", "learningRate": 0.003}},
}


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two spec dicts (override wins)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def spec_dict(**sections: Any) -> dict[str, Any]:
    return merge(BASE, sections)


def spec(**sections: Any) -> api.TrainingJobSpec:
    return api.TrainingJobSpec.model_validate(spec_dict(**sections))


def write_config(path: Path, body: Mapping[str, Any], name: str = "test-job") -> Path:
    """A whole TrainingJob YAML file around ``body`` (a spec dict)."""
    job = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": dict(body)}
    path.write_text(yaml.safe_dump(job))
    return path


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` threads (the test machine's cores are shared), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def trainer_env(**extra: str) -> dict[str, str]:
    """The environment of a trainer subprocess: source roots importable, one thread, no cluster or
    torch.distributed variables inherited from whoever runs the tests."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KILN_")
        and k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX"}
    }
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in SOURCE_ROOTS] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def trainer_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kiln_trainer", "--config", str(config), "--output", str(output), *extra]


def run_trainer(
    config: Path, output: Path, *extra: str, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real trainer CLI, to completion."""
    return subprocess.run(
        trainer_command(config, output, "--metrics-port", "0", *extra),
        env=dict(env) if env is not None else trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_cifar10(folder: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """A CIFAR-10 python-format folder as the official archive unpacks it (``cifar-10-batches-py/`` with
    pickled ``data_batch_1``..``5``, ``test_batch`` and ``batches.meta``), holding random images whose colour
    depends on the class, so there is something to learn."""
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        base = (labels[:, None] * 25).astype(np.int64)
        data = np.clip(base + rng.integers(0, 30, size=(per_batch, 3072)), 0, 255).astype(np.uint8)
        entry = {
            "batch_label": f"{name} of 6",
            "labels": [int(x) for x in labels],
            "data": data,
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        with open(batches / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072}, f, protocol=2)
    return folder


def write_image_folder(folder: Path, classes: tuple[str, ...] = ("circle", "square"), per_class: int = 6) -> Path:
    """An ImageFolder tree of small RGB PNGs, one sub-folder per class."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * index, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


class ApiServer:
    """Records every request; answers 200 with an empty object, or ``fail_with``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_with: int | None = None
        self.unavailable_times = 0  # answer this many requests 503 first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(
                    {"path": self.path, "content_type": self.headers["Content-Type"], "body": json.loads(body)}
                )
                status = outer.fail_with or 200
                if outer.unavailable_times > 0:
                    outer.unavailable_times -= 1
                    status = 503
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def statuses(self) -> list[dict[str, Any]]:
        return [r["body"]["status"] for r in self.requests]


def write_kubeconfig(path: Path, server: str) -> Path:
    """A real kubeconfig file pointing the Kubernetes client at ``server``."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server}}],
        "users": [{"name": "trainer", "user": {"token": "test-token"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "trainer"}}],
        "current-context": "local",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    return path


# -- the compile step on a tiny model ----------------------------------------------------------------------------

COMPILE_SIZE = 16


class TinyNet(torch.nn.Module):
    """A conv net small enough to export and quantize in a second or two."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


def compile_inputs(model: torch.nn.Module, *, calibration: int = 8, classes: int = 3) -> Any:
    """CompileInputs for ``model`` on 12 random COMPILE_SIZE images (kiln_trainer.compile imported here:
    onnx only for the tests that compile)."""
    from kiln_trainer import compile as compiler

    rng = np.random.default_rng(0)
    images = rng.standard_normal((12, 3, COMPILE_SIZE, COMPILE_SIZE)).astype(np.float32)
    return compiler.CompileInputs(
        model=model.eval(),
        val_images=images,
        val_labels=rng.integers(0, classes, len(images)),
        calibration_images=images[:calibration],
        class_names=[f"class-{i}" for i in range(classes)],
        preprocessing=api.Preprocessing(image_size=COMPILE_SIZE, mean=[0.5] * 3, std=[0.5] * 3),
        training=api.TrainingSummary(
            architecture="small-cnn",
            dataset="fake",
            epochs_requested=1,
            epochs_run=1,
            best_epoch=1,
            best_val_accuracy=0.3,
            stop_reason="epochs",
            duration_seconds=1.0,
        ),
        metrics=api.Metrics(accuracy=0.3),
    )


# -- two local ranks ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(commands: list[list[str]], envs: list[dict[str, str]], timeout: float = 600) -> list[tuple[str, str]]:
    """Run one process per rank at once and return each one's (stdout, stderr), asserting every one exited 0."""
    ranks = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, env in zip(commands, envs, strict=True)
    ]
    try:
        outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    for rank, (_, stderr) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, stderr
    return outputs
