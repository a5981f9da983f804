"""A pod's volumes as local folders, filled the way the kubelet fills them.

- emptyDir: a fresh folder in the pod's folder.
- persistentVolumeClaim: the bound PersistentVolume's hostPath (the node agent provisions one folder per
  claim, so every pod using a claim shares it), else a folder per claim.
- hostPath: the path itself.
- configMap / secret: one file per key (or per listed item).
- downwardAPI: one file per item.
- projected: all of the above plus serviceAccountToken, a TokenRequest token bound to the pod.
Anything else becomes an empty folder. Files are written once, when the pod starts (no live updates).
"""

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_cluster import podenv
from kiln_cluster.rest import Kube

Obj = dict[str, Any]


class VolumeNotReady(Exception):
    """A referenced ConfigMap, Secret or claim does not exist yet; the kubelet would retry, so does the agent."""


@dataclass
class PodContext:
    """What volume sources need to know about the pod."""

    kube: Kube
    pod: Obj
    folder: Path
    claims_root: Path
    pod_ip: str
    host_ip: str


def _write(target: Path, data: bytes, mode: int | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode if mode is not None else 0o644)


def _keyed(ctx: PodContext, source: Obj, kind: str, target: Path, default_mode: int | None) -> None:
    """Write a ConfigMap's or Secret's keys (or `items`) as files."""
    namespace = ctx.pod["metadata"]["namespace"]
    name = source.get("name") or source.get("secretName", "")
    plural = "configmaps" if kind == "configMap" else "secrets"
    obj = ctx.kube.get_or_none(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    if obj is None:
        if source.get("optional"):
            target.mkdir(parents=True, exist_ok=True)
            return
        raise VolumeNotReady(f"{kind} {namespace}/{name} not found")
    if kind == "configMap":
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    else:
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    items = source.get("items") or [{"key": k, "path": k} for k in data]
    target.mkdir(parents=True, exist_ok=True)
    for item in items:
        if item["key"] in data:
            _write(target / item["path"], data[item["key"]], item.get("mode", source.get("defaultMode", default_mode)))


def _downward(ctx: PodContext, items: list[Obj], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in items:
        if "fieldRef" in item:
            value = podenv.field_value(ctx.pod, item["fieldRef"]["fieldPath"], ctx.pod_ip, ctx.host_ip)
        else:
            container = next(
                c
                for c in ctx.pod["spec"]["containers"]
                if c["name"] == item["resourceFieldRef"].get("containerName", c["name"])
            )
            value = podenv.resource_value(container, item["resourceFieldRef"], {})
        _write(target / item["path"], value.encode(), item.get("mode"))


def _token(ctx: PodContext, source: Obj, target: Path) -> str:
    """A service-account token for the pod's ServiceAccount, bound to the pod, written to `target`."""
    meta, spec = ctx.pod["metadata"], ctx.pod["spec"]
    request: Obj = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": max(int(source.get("expirationSeconds", 3607)), 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        },
    }
    if source.get("audience"):
        request["spec"]["audiences"] = [source["audience"]]
    account = spec.get("serviceAccountName") or "default"
    answer = ctx.kube.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", request)
    token: str = answer["status"]["token"]
    _write(target / source.get("path", "token"), token.encode(), 0o600)
    return token


def _claim_folder(ctx: PodContext, claim: str) -> Path:
    namespace = ctx.pod["metadata"]["namespace"]
    pvc = ctx.kube.get_or_none(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    if pvc is None:
        raise VolumeNotReady(f"persistentvolumeclaim {namespace}/{claim} not found")
    volume_name = pvc["spec"].get("volumeName")
    if volume_name:
        pv = ctx.kube.get_or_none(f"/api/v1/persistentvolumes/{volume_name}") or {}
        host_path = (pv.get("spec") or {}).get("hostPath", {}).get("path")
        if host_path:
            return Path(str(host_path))
    folder: Path = ctx.claims_root / namespace / claim
    return folder


def materialize(ctx: PodContext) -> tuple[dict[str, Path], str | None]:
    """Create every volume of the pod; return {volume name: local folder} and the pod's token, if any."""
    folders: dict[str, Path] = {}
    token: str | None = None
    for volume in ctx.pod["spec"].get("volumes") or []:
        name = volume["name"]
        local = ctx.folder / "volumes" / name
        if "persistentVolumeClaim" in volume:
            local = _claim_folder(ctx, volume["persistentVolumeClaim"]["claimName"])
        elif "hostPath" in volume:
            local = Path(volume["hostPath"]["path"])
        elif "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            _keyed(ctx, volume[kind], kind, local, volume[kind].get("defaultMode"))
        elif "downwardAPI" in volume:
            _downward(ctx, volume["downwardAPI"].get("items") or [], local)
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token = _token(ctx, source["serviceAccountToken"], local)
                elif "configMap" in source or "secret" in source:
                    kind = "configMap" if "configMap" in source else "secret"
                    _keyed(ctx, source[kind], kind, local, volume["projected"].get("defaultMode"))
                elif "downwardAPI" in source:
                    _downward(ctx, source["downwardAPI"].get("items") or [], local)
        local.mkdir(parents=True, exist_ok=True)
        folders[name] = local
    return folders, token


def mounts(container: Obj, folders: dict[str, Path]) -> list[tuple[str, Path]]:
    """(mountPath, local folder) for each of a container's volumeMounts, honouring subPath."""
    result = []
    for mount in container.get("volumeMounts") or []:
        local = folders[mount["name"]]
        if mount.get("subPath"):
            local = local / mount["subPath"]
            if not local.exists():  # the kubelet creates a missing subPath as a folder
                local.mkdir(parents=True)
        if mount["mountPath"].rstrip("/"):
            result.append((mount["mountPath"], local))
    return result
