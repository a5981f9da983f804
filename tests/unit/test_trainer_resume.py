"""Checkpoints and resume with real processes: a SIGKILLed trainer continues at the next epoch and ends with
the model an uninterrupted run produces; SIGTERM stops between steps and leaves a usable checkpoint."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import trainer_support as support

from kiln_trainer import checkpoint

EPOCHS = 4


def _wait_for(path: Path, process: subprocess.Popen[str], deadline_s: float = 240) -> None:
    """Until ``path`` exists; fails if the process ends first (the deadline only guards against a hang)."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        assert process.poll() is None, f"trainer exited with {process.returncode} before {path.name} appeared"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


def _epochs_logged(stdout: str) -> list[int]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [line["epoch"] for line in lines if line["event"] == "epoch"]


def _model(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(path)["model"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    body = support.spec_dict(data={"maxSamples": 500}, training={"epochs": EPOCHS, "keepCheckpoints": 10})
    return support.write_config(tmp_path_factory.mktemp("config") / "job.yaml", body)


@pytest.fixture(scope="module")
def uninterrupted(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    done = support.run_trainer(config, output, "--no-compile", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    assert _epochs_logged(done.stdout) == list(range(1, EPOCHS + 1))
    return output


def test_the_trainer_resumes_at_the_next_epoch_after_a_kill_and_matches_an_uninterrupted_run(
    config: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    victim = subprocess.Popen(
        support.trainer_command(config, output, "--no-compile", "--metrics-port", "0"),
        env=support.trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        _wait_for(checkpoint.epoch_checkpoint_path(output, 1), victim)
        victim.send_signal(signal.SIGKILL)  # no handler, no cleanup: a node dying
    finally:
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_after = checkpoint.epoch_checkpoints(output)[-1][0]
    assert 1 <= killed_after < EPOCHS

    resumed = support.run_trainer(config, output, "--no-compile", "--log-format", "json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"continuing at epoch {killed_after + 1}" in resumed.stderr
    assert _epochs_logged(resumed.stdout) == list(range(killed_after + 1, EPOCHS + 1))
    final = checkpoint.load_checkpoint(checkpoint.epoch_checkpoint_path(output, EPOCHS))
    assert final["epoch"] == EPOCHS and [h["epoch"] for h in final["history"]] == list(range(1, EPOCHS + 1))
    # Each epoch reseeds from (seed, epoch), and optimizer, schedule and RNG states are restored: on the same
    # machine and thread count the resumed weights are bit-for-bit those of the uninterrupted run.
    reference = _model(checkpoint.epoch_checkpoint_path(uninterrupted, EPOCHS))
    for key, tensor in final["model"].items():
        assert torch.equal(tensor, reference[key]), key
    best, reference_best = (
        _model(checkpoint.best_checkpoint_path(output)),
        _model(checkpoint.best_checkpoint_path(uninterrupted)),
    )
    assert all(torch.equal(best[k], reference_best[k]) for k in best)


def test_sigterm_stops_between_steps_and_the_next_run_resumes(config: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    trainer = subprocess.Popen(
        support.trainer_command(config, output, "--no-compile", "--metrics-port", "0"),
        env=support.trainer_env(KILN_TERMINATION_LOG=str(tmp_path / "termination-log")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(checkpoint.epoch_checkpoint_path(output, 1), trainer)
        trainer.send_signal(signal.SIGTERM)
        _, stderr = trainer.communicate(timeout=240)
    finally:
        trainer.kill()
    if trainer.returncode == 0:
        pytest.skip("training ended before SIGTERM arrived")
    assert trainer.returncode == 128 + signal.SIGTERM, stderr
    assert "stopping after the current step" in stderr
    assert "interrupted by signal 15" in (tmp_path / "termination-log").read_text()
    latest_epoch, latest = checkpoint.epoch_checkpoints(output)[-1]
    assert checkpoint.load_checkpoint(latest)["epoch"] == latest_epoch  # intact and loadable
    assert not list((output / "checkpoints").glob("*.tmp"))

    resumed = support.run_trainer(config, output, "--no-compile", "--log-format", "json")
    assert resumed.returncode == 0, resumed.stderr
    assert _epochs_logged(resumed.stdout) == list(range(latest_epoch + 1, EPOCHS + 1))
