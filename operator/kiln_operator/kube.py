"""A thin, synchronous Kubernetes adapter over the `kubernetes` client: plain dicts in and out.

kopf runs sync handlers in a thread pool, so blocking calls are fine here. Requests go through the
client's generic `DynamicClient.request` with paths built from a small table of the kinds the operator
touches; no per-kind generated models, so manifests are sent exactly as the builders wrote them.
"""

import json
import os
from collections.abc import Mapping
from typing import Any, Final

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from kiln.api import constants
from kiln_operator.objects import MANAGER as FIELD_MANAGER
from kiln_operator.objects import Manifest

MERGE_PATCH: Final = "application/merge-patch+json"
APPLY_PATCH: Final = "application/apply-patch+yaml"
# (connect, read) seconds: a hung API server fails a request instead of freezing a handler thread forever.
REQUEST_TIMEOUT: Final = (5.0, 30.0)
PLURALS: Final = {
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Pod": "pods",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "Deployment": "deployments",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Lease": "leases",
    constants.KIND: constants.PLURAL,
}


class KubeConfigError(RuntimeError):
    """No usable credentials, or an API server that cannot be reached; the message says which."""


def load_configuration() -> client.Configuration:
    """In-cluster credentials when running in a pod, else the KUBECONFIG file (or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return configuration
    except config.ConfigException:
        pass
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig.split(os.pathsep)[0], client_configuration=configuration
        )
    except Exception as err:  # a missing, unreadable or malformed file, or a context it does not name
        raise KubeConfigError(f"cannot load Kubernetes credentials from {kubeconfig!r}: {err}") from None
    return configuration


def path(api_version: str, kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of a namespaced collection or object."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    result = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    if name:
        result += f"/{name}"
    if subresource:
        result += f"/{subresource}"
    return result


def is_conflict(err: BaseException) -> bool:
    """409: AlreadyExists on create, or a stale resourceVersion on update."""
    return isinstance(err, ApiException) and err.status == 409


def is_not_found(err: BaseException) -> bool:
    return isinstance(err, ApiException) and err.status == 404


def is_transient(err: BaseException) -> bool:
    """Worth another try after a fresh read: conflicts, throttling, server errors, broken connections."""
    if isinstance(err, ApiException):
        return err.status in (409, 429) or (err.status or 0) >= 500
    return isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class Kube:
    """The calls the operator makes, on one connection pool sized for kopf's handler threads."""

    def __init__(self, configuration: client.Configuration, pool_size: int = 32) -> None:
        configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, pool_size)
        self.host: str = configuration.host
        # Asking for the server's version up front turns bad credentials or an unreachable server into one
        # clear error at start instead of failing handlers later.
        try:
            self._dynamic = DynamicClient(client.ApiClient(configuration))  # type: ignore[no-untyped-call]
            self.version = self.server_version()
        except ApiException as err:
            raise KubeConfigError(
                f"the API server at {configuration.host} refused the credentials: {err.status} {err.reason}"
            ) from None
        except Exception as err:  # urllib3's connection errors, TLS errors, timeouts
            raise KubeConfigError(f"cannot reach the API server at {configuration.host}: {err}") from None

    def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Manifest:
        """One API call; raises ApiException (with .status) for non-2xx answers."""
        response = self._dynamic.request(
            method,
            url,
            body=body,
            query_params=list(query or []),
            content_type=content_type,
            serialize=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        data = response.data
        result: Manifest = json.loads(data) if data else {}
        return result

    def server_version(self) -> str:
        return str(self.request("GET", "/version").get("gitVersion", "unknown"))

    def has_trainingjob_api(self) -> bool:
        """Whether the TrainingJob CRD is served (discovery is readable by every authenticated user)."""
        try:
            resources = self.request("GET", f"/apis/{constants.API_VERSION}").get("resources") or []
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return any(r.get("name") == constants.PLURAL for r in resources)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(api_version, kind, namespace, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def list_objects(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Manifest]:
        answer = self.request("GET", path(api_version, kind, namespace), query=[("labelSelector", label_selector)])
        items: list[Manifest] = answer.get("items") or []
        return items

    def create_if_absent(self, obj: Mapping[str, Any]) -> bool:
        """Create; True if created, False if it already existed (409 is success: names are deterministic)."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            self.request("POST", url, dict(obj), query=[("fieldManager", FIELD_MANAGER)])
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def apply(self, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> Manifest:
        """Server-side apply: create or converge to exactly these fields, owned by the operator."""
        meta = obj["metadata"]
        url = path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", field_manager), ("force", "true")]
        return self.request("PATCH", url, json.dumps(obj), query=query, content_type=APPLY_PATCH)

    def patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: Mapping[str, Any], subresource: str = ""
    ) -> Manifest:
        """A JSON merge patch (None values delete keys)."""
        url = path(api_version, kind, namespace, name, subresource or None)
        return self.request("PATCH", url, dict(body), content_type=MERGE_PATCH)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete in the background (dependents follow); False if it was already gone."""
        try:
            options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
            self.request("DELETE", path(api_version, kind, namespace, name), options)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def get_trainingjob(self, namespace: str, name: str) -> Manifest | None:
        return self.get(constants.API_VERSION, constants.KIND, namespace, name)

    def patch_trainingjob_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str | None = None
    ) -> Manifest:
        """Merge-patch the status; with `resource_version`, only if the TrainingJob is still at that version (else
        409 Conflict)."""
        body: Manifest = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.patch(constants.API_VERSION, constants.KIND, namespace, name, body, "status")
