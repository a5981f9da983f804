"""Errors the trainer raises on purpose, each mapped to an exit code by the CLI."""

from kiln import api


class ConfigError(api.ConfigError):
    """Invalid config or data (missing dataset, empty folder, corrupt or foreign checkpoint): retrying cannot
    help, so the CLI exits with ``api.EXIT_CONFIG_ERROR`` and the operator fails the job at once."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; training stopped between steps and the last checkpoint is intact."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class CompileError(Exception):
    """The compile step could not produce a faithful ONNX model (export refused, parity broken, no calibration
    data): the checkpoint is intact, so ``kiln compile`` can be re-run once the cause is fixed."""
