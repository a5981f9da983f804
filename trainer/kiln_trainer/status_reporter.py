"""Reports training progress into the TrainingJob's status through the Kubernetes API.

Active only in a cluster (KILN_TRAININGJOB_NAME and KILN_TRAININGJOB_NAMESPACE set by the operator) and only
on rank 0. Uses the pod's service account (in-cluster config), or KUBECONFIG when that is set instead.
Progress is throttled to one patch every ``min_interval`` seconds; what a throttled call carried is kept and
sent with the next one, and ``flush`` always sends. A failed progress patch is logged and never fails
training. The model report is different: the operator waits for status.model to roll out serving, so it is
retried with backoff, and if it still cannot be written `model` raises ReportError and the trainer exits
non-zero (the Job retries the pod, which resumes from the last checkpoint) rather than leaving a dead end.
"""

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Final

from kiln import api
from kiln.api import constants

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# Pauses between attempts at the model report: about two minutes in all, longer than an API server restart.
MODEL_RETRY_DELAYS: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0, 30.0)


class ReportError(RuntimeError):
    """status.model could not be written after every retry."""


def _custom_objects_api() -> Any:
    """A CustomObjectsApi on its own client: the pod's service account, else the KUBECONFIG file."""
    from kubernetes import client, config

    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        api_client = client.ApiClient(configuration)
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            raise
        api_client = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig.split(os.pathsep)[0]
        )
    return client.CustomObjectsApi(api_client)


class StatusReporter:
    """Merge-patches ``status`` of one TrainingJob; a no-op without a job name."""

    def __init__(
        self,
        name: str | None,
        namespace: str | None,
        *,
        min_interval: float = 5.0,
        retry_delays: Sequence[float] = MODEL_RETRY_DELAYS,
    ) -> None:
        self.name, self.namespace, self.min_interval = name, namespace, min_interval
        self.retry_delays = tuple(retry_delays)
        self.enabled = bool(name and namespace)
        self._api: Any = None
        self._pending: dict[str, Any] = {}
        self._last_sent: float | None = None
        self.sent = 0  # patches accepted by the API server
        self.failed = 0

    @classmethod
    def from_env(cls, *, enabled: bool = True, min_interval: float = 5.0) -> "StatusReporter":
        """The reporter for this pod: enabled when the operator named the job and ``enabled`` (rank 0)."""
        if not enabled:
            return cls(None, None)
        return cls(
            os.environ.get(constants.ENV_TRAININGJOB_NAME),
            os.environ.get(constants.ENV_TRAININGJOB_NAMESPACE),
            min_interval=min_interval,
        )

    def progress(self, progress: api.Progress, last_checkpoint: str | None = None) -> None:
        """Queue live progress; sent now unless a patch went out less than ``min_interval`` seconds ago."""
        update: dict[str, Any] = {"progress": progress.to_dict()}
        if last_checkpoint is not None:
            update["lastCheckpoint"] = last_checkpoint
        self._queue(update)
        if self._last_sent is None or time.monotonic() - self._last_sent >= self.min_interval:
            self.flush()

    def final(
        self, progress: api.Progress, metrics: api.Metrics, warnings: list[str], last_checkpoint: str | None
    ) -> None:
        """The end of training: last progress, metrics of the best model and warnings, always sent."""
        update: dict[str, Any] = {"progress": progress.to_dict(), "metrics": metrics.to_dict(), "warnings": warnings}
        if last_checkpoint is not None:
            update["lastCheckpoint"] = last_checkpoint
        self._queue(update)
        self.flush()

    def model(self, model: api.ModelStatus) -> None:
        """The compiled model chosen for serving, with whatever is queued: retried with backoff; ReportError
        when every attempt failed."""
        if not self.enabled:
            return
        body = {"status": {**self._pending, "model": model.to_dict()}}
        self._pending = {}
        for delay in self.retry_delays:
            if self._send(body):
                return
            log.warning("status: retrying the model report in %.0f s", delay)
            time.sleep(delay)
        if not self._send(body):
            raise ReportError(
                f"cannot write status.model of trainingjob {self.namespace}/{self.name} after "
                f"{len(self.retry_delays) + 1} attempts; the model is on disk and is reported on the next try"
            )

    def _queue(self, update: dict[str, Any]) -> None:
        if self.enabled:
            self._pending.update(update)

    def flush(self) -> None:
        """Send whatever is queued; errors are logged, never raised."""
        if not self.enabled or not self._pending:
            return
        body = {"status": self._pending}
        self._pending = {}
        self._send(body)

    def _send(self, body: dict[str, Any]) -> bool:
        """One merge patch of the status subresource; False (logged) when it failed."""
        self._last_sent = time.monotonic()
        try:
            if self._api is None:
                self._api = _custom_objects_api()
            self._api.patch_namespaced_custom_object_status(
                constants.GROUP,
                constants.VERSION,
                self.namespace,
                constants.PLURAL,
                self.name,
                body,
                _content_type=MERGE_PATCH,
                _request_timeout=(3, 10),
            )
            self.sent += 1
            return True
        except Exception as err:  # the API server, RBAC, the network: none of it may stop training
            self.failed += 1
            log.warning(
                "status: cannot patch trainingjob %s/%s: %s",
                self.namespace,
                self.name,
                str(err).splitlines()[0] if str(err) else type(err).__name__,
            )
            return False
