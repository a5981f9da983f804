"""`kiln operator`: run the operator in this process (kopf in-process, not a `kopf run` subprocess).

This is the command the Helm chart's Deployment runs. Before kopf starts, the credentials and the API
server are checked once, so a bad KUBECONFIG fails fast with one clear line instead of retry loops.
"""

import argparse
import asyncio
import logging
import os
import socket
import sys

import kopf

from kiln.api import constants
from kiln_operator import config, handlers, kube, leader  # noqa: F401  (importing handlers registers them)

log = logging.getLogger(__name__)
LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="watch this namespace (repeatable; glob patterns such as 'team-*' allowed). "
        "Default: KILN_WATCH_NAMESPACES (comma-separated), else all namespaces",
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--standalone", action="store_true", default=True, help="run without peering with other replicas (default)"
    )
    peering.add_argument(
        "--peering", metavar="NAME", help="coordinate with other replicas through this kopf peering object instead"
    )
    parser.add_argument("--priority", type=int, default=0, help="peering priority (with --peering)")
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="run only while holding the kiln-operator Lease in $POD_NAMESPACE (for several replicas)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=constants.OPERATOR_HEALTH_PORT,
        help=f"serve the liveness probe at :PORT/healthz (default {constants.OPERATOR_HEALTH_PORT}; 0 disables)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=constants.OPERATOR_METRICS_PORT,
        help=f"serve Prometheus metrics at :PORT/metrics (default {constants.OPERATOR_METRICS_PORT}; 0 disables)",
    )
    parser.add_argument("--bind-host", default="0.0.0.0", help="address of both endpoints (default 0.0.0.0)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="full", help="log line format")


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"kiln operator: {message}\n")
    return code


def _port_in_use(host: str, port: int) -> str | None:
    """Why `port` cannot be served on `host`, checked before kopf starts (a failing startup handler retries)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return f"cannot serve on {host}:{port}: {err.strerror or err}"
    return None


def run(args: argparse.Namespace) -> int:
    """Check configuration and connectivity, then run kopf until SIGINT/SIGTERM."""
    try:
        cfg = config.OperatorConfig.from_env()
    except config.ConfigError as err:
        return _fail(str(err), 2)
    for port in (args.metrics_port, args.liveness_port):
        problem = _port_in_use(args.bind_host, port) if port else None
        if problem:
            return _fail(problem)
    kopf.configure(verbose=args.verbose, quiet=args.quiet, log_format=LOG_FORMATS[args.log_format])
    namespaces = list(args.namespaces or ([] if args.all_namespaces else cfg.watch_namespaces))
    try:
        client = kube.Kube(kube.load_configuration(), pool_size=32)
    except kube.KubeConfigError as err:
        return _fail(f"{err}\n  Set KUBECONFIG to a valid kubeconfig file, or run in a pod with a service account.")
    if not client.has_trainingjob_api():
        log.warning("the TrainingJob CRD (%s) is not installed yet; waiting for it", constants.API_VERSION)
    log.info(
        "kiln operator on %s (Kubernetes %s), watching %s",
        client.host,
        client.version,
        ", ".join(namespaces) if namespaces else "all namespaces",
    )
    if args.leader_elect:
        lease_namespace = os.environ.get("POD_NAMESPACE", "").strip()
        if not lease_namespace:
            return _fail("--leader-elect needs POD_NAMESPACE (the namespace of the Lease)", 2)
        elector = leader.LeaderElector(client, lease_namespace)
        log.info("waiting to lead (Lease %s/%s) as %s", lease_namespace, leader.LEASE_NAME, elector.identity)
        with leader.standby_health(args.bind_host, args.liveness_port):
            elector.wait_until_leader()
        elector.keep(on_lost=lambda: os._exit(1))  # exit at once: never act beside a newer leader
    memo = kopf.Memo(kube=client, config=cfg, metrics_port=args.metrics_port, bind_host=args.bind_host)
    liveness = f"http://{args.bind_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=args.peering is None,
                peering_name=args.peering,
                priority=args.priority,
                liveness_endpoint=liveness,
                memo=memo,
            )
        )
    except OSError as err:  # typically a port already in use
        return _fail(f"cannot start: {err}")
    except KeyboardInterrupt:
        pass
    return 0
