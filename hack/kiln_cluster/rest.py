"""A small Kubernetes API client for tests: dicts in, dicts out, the wire's camelCase names.

Tests read like the manifests they check (`pod["status"]["phase"]`), and the node agent needs nothing
beyond get/list/create/patch/delete/watch. Paths are built from apiVersion, plural and namespace;
`create_object` finds a kind's plural through discovery, so any manifest (a CRD, a rendered chart)
can be created as is, for real or as a server-side dry run.
"""

import json
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3

Obj = dict[str, Any]

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


class ApiError(Exception):
    """A non-2xx answer: the HTTP status and the API server's Status object."""

    def __init__(self, status: int, body: Obj, method: str, path: str) -> None:
        self.status = status
        self.body = body
        self.reason = str(body.get("reason", ""))
        self.message = str(body.get("message", body))
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    """`/api/v1/namespaces/ns/pods/name/status` and the like."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [base]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if sub:
        parts.append(sub)
    return "/".join(parts)


class Kube:
    """An authenticated connection to one API server, safe to share between threads."""

    def __init__(
        self,
        server: str,
        ca_pem: bytes,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        token: str | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        context = ssl.create_default_context(cadata=ca_pem.decode())
        if cert_pem and key_pem:
            # ssl loads client certificates from files only; they live as long as this process needs them.
            folder = Path(tempfile.mkdtemp(prefix="kiln-kube-client-"))
            (folder / "tls.crt").write_bytes(cert_pem)
            (folder / "tls.key").write_bytes(key_pem)
            context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = urllib3.PoolManager(ssl_context=context, maxsize=16, retries=False)
        self._plurals: dict[tuple[str, str], tuple[str, bool]] = {}
        self._lock = threading.Lock()

    # -- raw requests ---------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        """Send one request; return the decoded JSON answer, raise ApiError on a non-2xx status."""
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (params or {}).items()}
        headers = {**self._headers, "Accept": accept}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        response = self._http.request(
            method, self.server + path + _query_string(query), body=data, headers=headers, timeout=timeout
        )
        text = response.data.decode(errors="replace")
        try:
            decoded = json.loads(text) if text else {}
        except json.JSONDecodeError:
            decoded = {"message": text}
        if response.status >= 300:
            raise ApiError(response.status, decoded if isinstance(decoded, dict) else {"message": text}, method, path)
        return decoded

    def text(self, path: str, **params: Any) -> str:
        """A GET whose answer is plain text (a pod's log); ApiError on a non-2xx status."""
        query = {k: str(v) for k, v in params.items()}
        response = self._http.request(
            "GET", self.server + path + _query_string(query), headers={**self._headers, "Accept": "*/*"}, timeout=60.0
        )
        text: str = response.data.decode(errors="replace")
        if response.status >= 300:
            raise ApiError(response.status, {"message": text}, "GET", path)
        return text

    def get(self, path: str, **params: Any) -> Obj:
        result: Obj = self.request("GET", path, params=params)
        return result

    def list(self, path: str, **params: Any) -> list[Obj]:
        """The items of a list, e.g. `kube.list('/api/v1/namespaces/ns/pods', labelSelector='a=b')`."""
        items: list[Obj] = self.get(path, **params).get("items") or []
        return items

    def create(self, path: str, body: Obj, dry_run: bool = False) -> Obj:
        result: Obj = self.request("POST", path, body, params={"dryRun": "All"} if dry_run else None)
        return result

    def replace(self, path: str, body: Obj, dry_run: bool = False) -> Obj:
        result: Obj = self.request("PUT", path, body, params={"dryRun": "All"} if dry_run else None)
        return result

    def patch(self, path: str, body: Any, content_type: str = MERGE) -> Obj:
        result: Obj = self.request("PATCH", path, body, content_type=content_type)
        return result

    def delete(
        self, path: str, grace_seconds: int | None = None, propagation: str | None = None, uid: str | None = None
    ) -> Obj | None:
        """Delete; a missing object is not an error (returns None)."""
        options: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        if propagation:
            options["propagationPolicy"] = propagation
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            result: Obj = self.request("DELETE", path, options)
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        return result

    def get_or_none(self, path: str) -> Obj | None:
        try:
            return self.get(path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def table(self, path: str) -> Obj:
        """The server-side table `kubectl get` prints (columns from additionalPrinterColumns)."""
        result: Obj = self.request("GET", path, accept=TABLE)
        return result

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 30, **params: Any) -> Iterator[Obj]:
        """Stream watch events ({type, object}) from `resource_version` until the server ends the watch."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "allowWatchBookmarks": "true",
            **{k: str(v) for k, v in params.items()},
        }
        response = self._http.request(
            "GET",
            self.server + path + _query_string(query),
            headers={**self._headers, "Accept": "application/json"},
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=timeout_seconds + 15),
        )
        try:
            if response.status >= 300:
                raise ApiError(response.status, json.loads(response.read() or b"{}"), "WATCH", path)
            buffer = b""
            for chunk in response.stream(65536):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            response.release_conn()

    # -- whole manifests ------------------------------------------------------------------------------------

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural, namespaced) for a kind, from discovery; cached."""
        key = (api_version, kind)
        with self._lock:
            if key in self._plurals:
                return self._plurals[key]
        discovery = self.get("/api/v1" if api_version == "v1" else f"/apis/{api_version}")
        for res in discovery.get("resources", []):
            if res.get("kind") == kind and "/" not in res["name"]:
                with self._lock:
                    self._plurals[key] = (res["name"], bool(res["namespaced"]))
                return res["name"], bool(res["namespaced"])
        raise LookupError(f"the API server serves no kind {kind} in {api_version}")

    def object_path(self, obj: Mapping[str, Any], namespace: str | None = None, named: bool = True) -> str:
        """The path of a manifest's object (or of its collection when `named` is false)."""
        plural, namespaced = self.resource(obj["apiVersion"], obj["kind"])
        meta = obj.get("metadata", {})
        ns = (meta.get("namespace") or namespace or "default") if namespaced else None
        return resource_path(obj["apiVersion"], plural, ns, meta["name"] if named else None)

    def create_object(self, obj: Obj, namespace: str | None = None, dry_run: bool = False) -> Obj:
        """Create any manifest in `namespace` (unless it names its own, or is cluster-scoped)."""
        return self.create(self.object_path(obj, namespace, named=False), obj, dry_run=dry_run)

    def apply_object(self, obj: Obj, namespace: str | None = None, dry_run: bool = False) -> Obj:
        """Create, or replace what exists (as `kubectl apply` ends up doing); `dry_run` asks the server only."""
        try:
            return self.create_object(obj, namespace, dry_run=dry_run)
        except ApiError as err:
            if err.status != 409:
                raise
        current = self.get(self.object_path(obj, namespace))
        body = {
            **obj,
            "metadata": {**obj.get("metadata", {}), "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        return self.replace(self.object_path(obj, namespace), body, dry_run=dry_run)

    def get_object(self, obj: Mapping[str, Any], namespace: str | None = None) -> Obj | None:
        return self.get_or_none(self.object_path(obj, namespace))


def _query_string(query: Mapping[str, str]) -> str:
    if not query:
        return ""
    return "?" + urllib.parse.urlencode(query)
