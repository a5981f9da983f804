"""`kiln run FILE`: the embedded default. The same TrainingJob YAML a cluster takes, trained, compiled and
(with --serve) served on this machine, with no cluster at all.

Training runs in this process for one worker and as local DDP processes (torchrun-style environment) for
several; the server runs in this process until Ctrl-C. With ``kiln.cli`` this is the core's top floor: it
calls the trainer and the server through the typed entry points they expose (``train_file``,
``serve_local``), imported inside the functions that use them, so `kiln --help` stays instant and this module
is importable without torch.
"""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kiln import api
from kiln.api import constants

log = logging.getLogger("kiln.run")

EXIT_INTERRUPTED = 130


def ignored_fields(spec: api.TrainingJobSpec) -> list[str]:
    """Cluster-only settings that mean nothing on one machine, each named once so nothing is silently dropped."""
    fields_set = {
        "resources.gpusPerWorker": spec.resources.gpus_per_worker > 0,
        "resources.cpu": spec.resources.cpu is not None,
        "resources.memory": spec.resources.memory is not None,
        "resources.nodeSelector": bool(spec.resources.node_selector),
        "resources.tolerations": bool(spec.resources.tolerations),
        "resources.priorityClassName": spec.resources.priority_class_name is not None,
        "resources.image": spec.resources.image is not None,
        "runPolicy.backoffLimit": spec.run_policy.backoff_limit != api.spec.RunPolicySpec().backoff_limit,
        "runPolicy.activeDeadlineSeconds": spec.run_policy.active_deadline_seconds is not None,
        "runPolicy.ttlSecondsAfterFinished": spec.run_policy.ttl_seconds_after_finished is not None,
        "runPolicy.suspend": spec.run_policy.suspend,
        "data.volume": spec.data.volume is not None,
        "artifacts.volume": spec.artifacts.volume is not None,
        "serving.replicas": spec.serving.replicas != 1,
        "serving.cpu": spec.serving.cpu is not None,
        "serving.memory": spec.serving.memory is not None,
        "serving.image": spec.serving.image is not None,
    }
    return [name for name, is_set in fields_set.items() if is_set]


def _held_out_lines(card: api.ModelCard) -> list[str]:
    """Test-set and robustness figures, and where the plots are, when the card has them."""
    lines = []
    if card.test_metrics is not None:
        t = card.test_metrics
        lines.append(
            f"test accuracy {100 * t.accuracy:.2f}%  macro f1 {100 * t.macro_f1:.2f}%  on {t.samples} held-out images"
        )
    if card.adversarial is not None:
        a = card.adversarial
        lines.append(
            f"{a.attack} accuracy {100 * a.accuracy:.2f}% at epsilon {a.epsilon:.4f} ({a.space} units, {a.split} set)"
        )
    if card.plots:
        lines.append("plots: " + ", ".join(card.plots))
    return lines


def summary_table(card: api.ModelCard) -> str:
    """The end-of-run report: metrics of the best model and every compiled variant, the selected one marked."""
    m, t = card.metrics, card.training

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"model {card.name}: {t.architecture} on {t.dataset}, {t.epochs_run}/{t.epochs_requested} epochs "
        f"(best {t.best_epoch}, stopped by {t.stop_reason}) in {t.duration_seconds:.1f}s",
        f"accuracy {pct(m.accuracy)}  precision {pct(m.precision)}  recall {pct(m.recall)}  f1 {pct(m.f1)}"
        + (f"  adversarial {pct(m.adversarial_accuracy)}" if m.adversarial_accuracy is not None else ""),
        *_held_out_lines(card),
        "",
        f"{'variant':<14}{'accuracy':>10}{'ms@1':>10}{'ms@32':>10}{'size':>12}  status",
    ]
    for v in card.variants:
        status = "selected" if v.name == card.selected else ("rejected: " + (v.reason or "")) if v.rejected else ""
        size = f"{v.size_bytes / 1024:.0f} KiB"
        lines.append(
            f"{v.name:<14}{pct(v.accuracy):>10}{ms(v.latency_ms_batch1):>10}{ms(v.latency_ms_batch32):>10}"
            f"{size:>12}  {status}"
        )
    lines.append(f"selected {card.selected}: {card.selection_reason}")
    lines += [f"warning: {w}" for w in t.warnings]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_distributed(config: Path, output: Path, workers: int) -> int:
    """Several workers: one process per rank with the environment torchrun would give them."""
    port = _free_port()
    procs = []
    for rank in range(workers):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(workers),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        cmd = [sys.executable, "-m", "kiln_trainer", "--config", str(config), "--output", str(output)]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        return EXIT_INTERRUPTED
    return next((c for c in codes if c != 0), 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a TrainingJob YAML (the same one kubectl apply takes)")
    parser.add_argument("--output", type=Path, help="artifacts folder (default: runs/<name>)")
    parser.add_argument("--serve", action="store_true", help="serve the compiled model when training ends")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default: %(default)s, this machine only; 0.0.0.0 listens on all interfaces)",
    )
    parser.add_argument(
        "--port", type=int, default=constants.SERVING_HTTP_PORT, help="port to serve on (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve the trainer's Prometheus /metrics on this port, on all interfaces (default: 0 = off)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        job = api.load_trainingjob(args.file)
    except api.ConfigError as err:
        sys.stderr.write(f"{err}\n")
        return api.EXIT_CONFIG_ERROR
    name = job.metadata.name
    output: Path = args.output or Path("runs") / name
    for field in ignored_fields(job.spec):
        log.info("kiln run: ignoring %s (it only applies on a cluster)", field)

    from kiln_trainer import train_command  # lazily: torch loads only when training

    log.info("kiln run: training %s into %s", name, output)
    if job.spec.resources.workers > 1:
        code = _train_distributed(args.file, output, job.spec.resources.workers)
    else:
        code = train_command.train_file(args.file, output, metrics_port=args.metrics_port)
    if code in (EXIT_INTERRUPTED, 128 + signal.SIGTERM):
        sys.stderr.write(f"stopped; the last checkpoint in {output} is kept: run the same command again to resume\n")
    if code != 0:
        return code
    card = api.ModelCard.read(output / constants.MODEL_CARD_FILE)
    sys.stdout.write("\n" + summary_table(card))
    if not args.serve:
        return 0
    return _serve(output, name, args.host, args.port, job.spec.serving)


def _serve(model_dir: Path, name: str, host: str, port: int, serving: api.ServingSpec) -> int:
    from kiln_serving import serve_cli  # lazily: onnxruntime loads only when serving

    url = f"http://{host}:{port}"
    sys.stdout.write(
        f"\nserving {name} at {url}/v2/models/{name} (Ctrl-C to stop)\n"
        f"  curl {url}/v2/models/{name}\n"
        f"  curl --data-binary @deploy/kind/digit-8.png {url}/v2/models/{name}/classify"
        "  # a sample digit in the kiln repository\n"
        f"  python -c \"import tritonclient.http as h; c=h.InferenceServerClient('{host}:{port}'); "
        f"print(c.get_model_metadata('{name}'))\"\n"
    )
    sys.stdout.flush()
    return serve_cli.serve_local(model_dir, name, host=host, port=port, serving=serving)
