"""A container's command line, environment and working directory as the node agent starts them.

The environment is built as the kubelet builds it (envFrom, then env with `$(VAR)` expansion, fieldRef,
resourceFieldRef, configMapKeyRef, secretKeyRef), translated as podenv.py describes, on top of a small base:
PATH (the test interpreter's folder first), HOME and TMPDIR in the pod's folder, PYTHONPATH from the test
run, PYTHONUNBUFFERED=1, OMP_NUM_THREADS=1 (a CPU limit would cap threads in a cluster) and, when a
service-account token is mounted, KUBECONFIG: a per-pod kubeconfig with that token (bound to the pod),
because a process cannot see the token at /var/run/secrets/kubernetes.io/serviceaccount. kiln's trainer
falls back from in-cluster config to KUBECONFIG, as kopf and client-go do. Every container also gets
GLOO_SOCKET_IFNAME=lo and KILN_TERMINATION_LOG, a per-container file whose content becomes the terminated
state's message.
"""

import base64
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln_cluster import podenv, volumes

if TYPE_CHECKING:
    from kiln_cluster.kubelet import NodeAgent
    from kiln_cluster.podrunner import Container, PodRunner

Obj = dict[str, Any]


def plan(
    agent: "NodeAgent", runner: "PodRunner", container: "Container", folders: dict[str, Path], token: str | None
) -> tuple[list[str], dict[str, str], Path]:
    """(argv, env, cwd) for one container of `runner`'s pod."""
    spec, mounts = container.spec, volumes.mounts(container.spec, folders)

    def translate(text: str, declared: dict[str, str]) -> str:
        return podenv.rewrite(podenv.expand(text, declared), mounts, runner.ip, runner.namespace, agent.resolve)

    tmp = runner.folder / "tmp"
    tmp.mkdir(exist_ok=True)
    base = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(runner.folder),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": runner.pod["spec"].get("hostname") or runner.pod_name,
        "OMP_NUM_THREADS": "1",
    }
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if token:
        kubeconfig = agent.control_plane.write_kubeconfig(runner.folder / "kubeconfig", {"token": token})
        base["KUBECONFIG"] = str(kubeconfig)

    # -- what the pod spec declares, in the kubelet's order
    declared: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        kind = "configMap" if "configMapRef" in source else "secret"
        ref = source.get("configMapRef") or source.get("secretRef") or {}
        for key, value in keyed_values(agent, runner.namespace, kind, ref["name"], ref.get("optional")).items():
            declared[source.get("prefix", "") + key] = value
    for var in spec.get("env") or []:
        if "valueFrom" in var:
            declared[var["name"]] = value_from(agent, runner, spec, var["valueFrom"])
        else:
            declared[var["name"]] = translate(var.get("value", ""), declared)

    env = {**base, **declared, "GLOO_SOCKET_IFNAME": "lo", "KILN_TERMINATION_LOG": str(container.termination_log)}
    words = [*(spec.get("command") or []), *(spec.get("args") or [])]
    argv = podenv.resolve_command([translate(w, declared) for w in words])
    cwd = Path(translate(spec["workingDir"], declared)) if spec.get("workingDir") else runner.folder
    return argv, env, cwd if cwd.is_dir() else runner.folder


def keyed_values(agent: "NodeAgent", namespace: str, kind: str, name: str, optional: bool | None) -> dict[str, str]:
    """A ConfigMap's or Secret's data as strings; VolumeNotReady (retried) while it is missing."""
    plural = "configmaps" if kind == "configMap" else "secrets"
    obj = agent.kube.get_or_none(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    if obj is None:
        if optional:
            return {}
        raise volumes.VolumeNotReady(f"{kind} {namespace}/{name} not found")
    data = obj.get("data") or {}
    return dict(data) if kind == "configMap" else {k: base64.b64decode(v).decode() for k, v in data.items()}


def value_from(agent: "NodeAgent", runner: "PodRunner", spec: Obj, source: Obj) -> str:
    """One env var's valueFrom."""
    if "fieldRef" in source:
        return podenv.field_value(runner.pod, source["fieldRef"]["fieldPath"], runner.ip, agent.host_ip)
    if "resourceFieldRef" in source:
        return podenv.resource_value(spec, source["resourceFieldRef"], podenv.NODE_CAPACITY)
    kind = "configMap" if "configMapKeyRef" in source else "secret"
    ref = source.get("configMapKeyRef") or source.get("secretKeyRef") or {}
    values = keyed_values(agent, runner.namespace, kind, ref["name"], ref.get("optional"))
    if ref["key"] not in values and not ref.get("optional"):
        raise volumes.VolumeNotReady(f"key {ref['key']} not in {kind} {runner.namespace}/{ref['name']}")
    return values.get(ref["key"], "")
