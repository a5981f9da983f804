"""Local mode, the embedded default: `kiln run FILE` trains, compiles and serves on this machine, and the demo
that `make demo` runs works end to end. Real training on scikit-learn's digits, a real server, real clients."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml

from kiln import api
from kiln.api import constants
from kiln_cluster.controlplane import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _job(tmp_path: Path, name: str, **training: object) -> Path:
    """The digits example, shortened for a test."""
    job = yaml.safe_load((ROOT / "deploy/examples/digits-cnn.yaml").read_text())
    job["metadata"]["name"] = name
    job["spec"]["training"].update({"epochs": 3, "targetAccuracy": None, **training})
    job["spec"]["export"]["variants"] = ["fp32", "int8-static"]
    job["spec"]["export"]["calibration"]["samples"] = 64
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_ready(client: httpclient.InferenceServerClient, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kiln run exited with {proc.returncode}"
        try:
            if client.is_server_ready():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise AssertionError("server not ready in time")


def test_kiln_run_trains_compiles_serves_and_answers_real_digits(tmp_path: Path) -> None:
    config, output, port = _job(tmp_path, "digits-local"), tmp_path / "out", free_port()
    cmd = [
        sys.executable,
        "-m",
        "kiln.cli",
        "run",
        str(config),
        "--output",
        str(output),
        "--serve",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        _wait_ready(client, proc, timeout=600)
        card = api.ModelCard.read(output / "model-card.json")
        assert card.selected in {"fp32", "int8-static"}
        # The validation split the trainer used, preprocessed exactly as the model card says.
        from kiln_trainer import data

        bundle = data.load_data(api.load_trainingjob(config).spec)
        images, labels = data.stack_images(bundle.val, limit=64)
        assert bundle.mean == card.preprocessing.mean and bundle.image_size == card.preprocessing.image_size
        request = httpclient.InferInput(card.input.name, list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        logits = client.infer("digits-local", [request]).as_numpy(card.output.name)
        assert logits is not None and logits.shape == (64, 10)
        accuracy = float((np.argmax(logits, axis=1) == labels).mean())
        assert accuracy >= 0.85, f"served model got {accuracy:.2f} on the validation digits"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "selected" in out and "accuracy" in out and "precision" in out, "the summary table is printed"
    assert "serving digits-local at" in out and "curl" in out, "how to query it is printed"
    sample = next(word for word in out.split() if word.startswith("@") and word.endswith(".png")).lstrip("@")
    assert (ROOT / sample).is_file(), f"the hint's sample image {sample} exists in the repository"


def test_ctrl_c_during_kiln_run_keeps_the_checkpoint_and_running_again_resumes(tmp_path: Path) -> None:
    config, output = _job(tmp_path, "digits-resume", epochs=4), tmp_path / "out"
    cmd = [sys.executable, "-m", "kiln.cli", "run", str(config), "--output", str(output)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = output / "checkpoints" / "epoch-0001.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the first epoch's checkpoint appears"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out
    assert not (output / "model-card.json").exists()

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    log = again.stdout + again.stderr
    assert "resuming from" in log and "continuing at epoch" in log
    assert "continuing at epoch 1 " not in log, "no epoch is redone from scratch"
    card = api.ModelCard.read(output / "model-card.json")
    assert card.training.epochs_run == 4


def test_kiln_run_reports_cluster_only_fields_once_and_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kiln.dev/v1alpha1\nkind: TrainingJob\nspec: {training: {epochs: -1}}\n")
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "run", str(bad)], capture_output=True, text=True)
    assert result.returncode == api.EXIT_CONFIG_ERROR
    assert "spec.training.epochs" in result.stderr

    from kiln import local

    spec = api.parse_trainingjob(
        {"resources": {"cpu": "2", "nodeSelector": {"gpu": "a100"}}, "runPolicy": {"suspend": True}}
    ).spec
    assert local.ignored_fields(spec) == ["resources.cpu", "resources.nodeSelector", "runPolicy.suspend"]
    assert local.ignored_fields(api.TrainingJobSpec()) == []


def test_kiln_run_with_two_workers_trains_as_local_ddp_processes(tmp_path: Path) -> None:
    config = _job(tmp_path, "digits-ddp", epochs=2)
    job = yaml.safe_load(config.read_text())
    job["spec"]["resources"] = {"workers": 2}
    config.write_text(yaml.safe_dump(job))
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "run", str(config), "--output", str(output)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    card = api.ModelCard.read(output / "model-card.json")
    assert card.training.workers == 2


def test_the_demo_trains_serves_queries_and_stops_the_server(tmp_path: Path) -> None:
    config = _job(tmp_path, "digits-demo")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy/demo.py"),
            str(config),
            "--output",
            str(tmp_path / "out"),
            "--samples",
            "6",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "correct" in result.stdout and "selected variant" in result.stdout
    assert "demo: server stopped" in result.stdout


def test_kiln_run_help_shows_the_port_defaults_and_which_server_listens_on_all_interfaces() -> None:
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: 127.0.0.1, this machine only" in text
    assert f"(default: {constants.SERVING_HTTP_PORT})" in text
    assert "on all interfaces (default: 0 = off)" in text
