"""``kiln train``: train (and compile) a model from a TrainingJob file; what trainer pods run. ``train_file``
is the same as a typed entry point (what ``kiln run`` calls).

Exit codes: 0 success; ``api.EXIT_CONFIG_ERROR`` (78) for an invalid config or data set, which the operator
fails at once instead of retrying; 128+N after signal N (a stop between steps); anything else is retryable.
On failure the last lines of the error go to the termination log, where Kubernetes shows them.
"""

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import api
from kiln.api import constants
from kiln_trainer import errors, launcher

if TYPE_CHECKING:  # progress loads torch; `kiln train --help` must not
    from kiln_trainer.progress import LogFormat

log = logging.getLogger("kiln_trainer")

DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")
ENV_TERMINATION_LOG = "KILN_TERMINATION_LOG"
_TERMINATION_LIMIT = 4000  # bytes; Kubernetes keeps at most 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="the TrainingJob (or just its spec) as YAML or JSON"
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="where checkpoints, compiled models and model-card.json go; a run resumes from here",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=constants.TRAINER_METRICS_PORT,
        metavar="N",
        help=f"serve Prometheus /metrics on this port while training; 0 = off "
        f"(default {constants.TRAINER_METRICS_PORT})",
    )
    parser.add_argument("--no-compile", action="store_true", help="train only; skip the ONNX compile step")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "bar"),
        default="auto",
        help="progress as a bar (terminal), JSON lines (logs), or auto (default)",
    )


def write_termination_message(message: str) -> None:
    """Leave the error where the kubelet picks it up: $KILN_TERMINATION_LOG when set (if its folder is
    writable), else /dev/termination-log when it exists (Kubernetes mounts it in every container)."""
    override = os.environ.get(ENV_TERMINATION_LOG)
    path = Path(override) if override else DEFAULT_TERMINATION_LOG
    if override:
        if not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
            return
    elif not path.exists():
        return
    text = message.strip()[-_TERMINATION_LIMIT:]
    try:
        path.write_text(text + "\n")
    except OSError as err:
        log.debug("cannot write termination message to %s: %s", path, err)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )


def _child_args(config: Path, output: Path, metrics_port: int, compile: bool, log_format: str) -> list[str]:
    """The arguments again, for the launcher's per-rank processes."""
    argv = ["--config", str(config), "--output", str(output), "--metrics-port", str(metrics_port)]
    argv += ["--log-format", log_format] + ([] if compile else ["--no-compile"])
    return argv


def run(args: argparse.Namespace) -> int:
    """`kiln train` with parsed flags."""
    return train_file(
        args.config,
        args.output,
        metrics_port=args.metrics_port,
        compile=not args.no_compile,
        log_format=args.log_format,
    )


def train_file(
    config: Path,
    output: Path,
    *,
    metrics_port: int = 0,
    compile: bool = True,
    log_format: "LogFormat" = "auto",
) -> int:
    """Load and validate the TrainingJob in ``config``, train into ``output``, hand off; map every failure to
    an exit code (see the module docstring). With several processes per pod (LOCAL_WORLD_SIZE > 1) this
    process is the launcher of its local ranks."""
    _configure_logging()
    try:
        count = launcher.processes(os.environ)
        if count > 1:
            return launcher.launch(_child_args(config, output, metrics_port, compile, log_format), count)
    except api.ConfigError as err:
        sys.stderr.write(f"kiln train: error: {err}\n")
        write_termination_message(str(err))
        return api.EXIT_CONFIG_ERROR
    from kiln_trainer import loop  # torch is imported only once the arguments are valid

    try:
        job = api.load_trainingjob(config)
        loop.train(
            job.spec,
            output,
            name=job.metadata.name,
            compile=compile,
            metrics_port=metrics_port,
            log_format=log_format,
        )
    except api.ConfigError as err:  # also kiln_trainer.errors.ConfigError
        sys.stderr.write(f"kiln train: error: {err}\n")
        write_termination_message(str(err))
        return api.EXIT_CONFIG_ERROR
    except errors.TrainingInterrupted as err:
        log.warning("training stopped by signal %d; run again with the same --output to resume", err.signum)
        write_termination_message(f"interrupted by signal {err.signum}; the last checkpoint is intact")
        return 128 + err.signum
    except KeyboardInterrupt:
        log.warning("interrupted; run again with the same --output to resume")
        return 130
    except Exception as err:
        from kiln_trainer import distributed

        if distributed.is_peer_failure(err):
            log.error("training stopped: a peer of the process group was lost (%s); the group restarts", err)
            write_termination_message(f"lost a peer of the process group: {err}")
            return constants.EXIT_PEER_LOST
        log.error("training failed: %s", err, exc_info=True)
        lines = traceback.format_exception(err)
        write_termination_message("".join(lines[-6:]))
        return 1
    return 0
