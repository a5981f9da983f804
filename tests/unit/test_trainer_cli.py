"""The real ``kiln train`` / ``python -m kiln_trainer`` in subprocesses: bad input exits 78 with one clear
line (and a termination message), progress lines, the /metrics endpoint."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trainer_support as support

from kiln import api
from kiln_cluster.controlplane import free_port
from kiln_trainer import checkpoint, train_command


def _fails_with_config_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == api.EXIT_CONFIG_ERROR, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kiln train: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_dataset_path_exits_78_naming_the_path_and_leaves_a_termination_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cifar"
    config = support.write_config(
        tmp_path / "job.yaml", support.spec_dict(data={"dataset": "cifar10", "path": str(missing)})
    )
    termination_log = tmp_path / "termination-log"
    result = support.run_trainer(
        config, tmp_path / "out", env=support.trainer_env(KILN_TERMINATION_LOG=str(termination_log))
    )
    _fails_with_config_error(result, f"data.path: {missing} does not exist (dataset cifar10)")
    assert f"{missing} does not exist" in termination_log.read_text()
    assert not (tmp_path / "out").exists()


def test_an_empty_image_folder_exits_78(tmp_path: Path) -> None:
    (tmp_path / "images" / "cats").mkdir(parents=True)
    config = support.write_config(
        tmp_path / "job.yaml", support.spec_dict(data={"dataset": "imagefolder", "path": str(tmp_path / "images")})
    )
    result = support.run_trainer(config, tmp_path / "out")
    _fails_with_config_error(result, f"data.path: {tmp_path / 'images'} holds no images for imagefolder")


def test_an_unknown_architecture_exits_78_through_the_kiln_command(tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "job.yaml", support.spec_dict(model={"architecture": "resnet9000"}))
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "train", "--config", str(config), "--output", str(tmp_path / "out")],
        env=support.trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == api.EXIT_CONFIG_ERROR
    assert "unknown architecture 'resnet9000'" in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_checkpoint_exits_78_naming_the_file(tmp_path: Path) -> None:
    config = support.write_config(tmp_path / "job.yaml", support.spec_dict())
    corrupt = checkpoint.epoch_checkpoint_path(tmp_path / "out", 1)
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PK\x03\x04 half a zip file")
    result = support.run_trainer(config, tmp_path / "out", "--no-compile")
    _fails_with_config_error(result, f"checkpoint {corrupt} is corrupt or not a kiln checkpoint")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    folder = tmp_path_factory.mktemp("trained")
    body = support.spec_dict(data={"maxSamples": 200}, training={"epochs": 1})
    result = support.run_trainer(
        support.write_config(folder / "job.yaml", body), folder / "out", "--no-compile", "--log-format", "json"
    )
    assert result.returncode == 0, result.stderr
    epochs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1]
    assert {"train_loss", "val_accuracy", "samples_per_second", "duration_seconds"} <= epochs[0].keys()
    return folder / "out", body


def test_a_checkpoint_from_a_different_training_config_exits_78_listing_what_changed(
    trained: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    output, body = trained
    other = support.merge(
        body, {"training": {"optimizer": {"learningRate": 0.01}}, "model": {"architecture": "resnet18"}}
    )
    result = support.run_trainer(support.write_config(tmp_path / "other.yaml", other), output, "--no-compile")
    _fails_with_config_error(result, "was written for a different config")
    assert "model.architecture: 'small-cnn' -> 'resnet18'" in result.stderr
    assert "training.optimizer.learningRate: 0.003 -> 0.01" in result.stderr


def test_a_checkpoint_survives_changes_to_serving_resources_and_workers_count(
    trained: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    output, body = trained
    other = support.merge(body, {"serving": {"replicas": 3}, "resources": {"cpu": "2"}, "data": {"numWorkers": 1}})
    result = support.run_trainer(support.write_config(tmp_path / "other.yaml", other), output, "--no-compile")
    assert result.returncode == 0, result.stderr
    assert "training already ended (epochs) after epoch 1; handing off" in result.stderr


def test_the_metrics_endpoint_serves_trainer_metrics_while_training(tmp_path: Path) -> None:
    port = free_port()
    body = support.spec_dict(data={"maxSamples": 300}, training={"epochs": 50})
    trainer = subprocess.Popen(
        support.trainer_command(
            support.write_config(tmp_path / "job.yaml", body),
            tmp_path / "out",
            "--no-compile",
            "--metrics-port",
            str(port),
        ),
        env=support.trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        text, end = "", time.monotonic() + 240
        while "kiln_trainer_epoch 0.0" in text or "kiln_trainer_epoch " not in text:
            assert trainer.poll() is None and time.monotonic() < end
            time.sleep(0.2)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue  # not listening yet
    finally:
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=240)
    for name in (
        "kiln_trainer_step",
        "kiln_trainer_train_loss",
        "kiln_trainer_validation_accuracy_ratio",
        "kiln_trainer_samples_per_second",
        "kiln_trainer_epoch_duration_seconds",
        "kiln_trainer_samples_total",
    ):
        assert f"\n{name} " in text, name
    assert trainer.returncode == 128 + signal.SIGTERM


def test_the_termination_message_goes_to_the_configured_path_and_keeps_the_end_of_long_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(train_command.ENV_TERMINATION_LOG, str(tmp_path / "termination-log"))
    train_command.write_termination_message("x" * 5000 + "\nRuntimeError: the last line")
    text = (tmp_path / "termination-log").read_text()
    assert len(text) <= 4096 and text.endswith("RuntimeError: the last line\n")
    monkeypatch.setenv(train_command.ENV_TERMINATION_LOG, str(tmp_path / "no-such-folder" / "termination-log"))
    train_command.write_termination_message("nowhere to go")  # silently skipped
    assert not (tmp_path / "no-such-folder").exists()
